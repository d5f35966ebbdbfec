"""The randomized refresh is GaLore's refresh: it returns G's singular vectors, not just their span.

Adam is elementwise, so a GaLore step depends on the basis P, not only on the subspace it spans:
a rotated basis gives another optimizer. These tests run GaLore's equations (written out here,
independently of the project's optimizer) with each refresh on the same gradients and compare the
trajectories, and check the shared sign convention directly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimtrain.registry.sharded import RowShards
from slimtrain.registry.subspace import canonical_signs, randomized_range, std_side, svd_projection

BETAS = (0.9, 0.999)
EPS = 1e-8


def low_rank_gradients(shape, rank, steps, seed):
    """Gradients of rank ``rank`` with a graded spectrum (1 .. 0.1), a new one each step."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    spectrum = torch.logspace(0, -1, rank, dtype=torch.float64)
    out = []
    for _ in range(steps):
        u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
        out.append(((u * spectrum) @ v.T).float())
    return out


def galore_trajectory(w0, gradients, rank, gap, refresh, lr=0.01, scale=0.25):
    """GaLore (paper equations, std side): returns the weights after every step."""
    side = std_side(tuple(w0.shape))
    w = w0.clone()
    m1 = v1 = proj = None
    out = []
    for t, g in enumerate(gradients, start=1):
        if (t - 1) % gap == 0:
            proj = refresh(g, side, seed=t)
        low = proj.T @ g if side == "left" else g @ proj.T
        if m1 is None:
            m1, v1 = torch.zeros_like(low), torch.zeros_like(low)
        m1 = BETAS[0] * m1 + (1 - BETAS[0]) * low
        v1 = BETAS[1] * v1 + (1 - BETAS[1]) * low * low
        direction = (m1 / (1 - BETAS[0] ** t)) / ((v1 / (1 - BETAS[1] ** t)).sqrt() + EPS)
        update = proj @ direction if side == "left" else direction @ proj
        w = w - lr * scale * update
        out.append(w.clone())
    return out


def randomized(rank, power_iters=2, oversample=0):
    def refresh(g, side, seed):
        return randomized_range(RowShards(g), rank, side, power_iters=power_iters, oversample=oversample, seed=seed)

    return refresh


def exact(rank):
    def refresh(g, side, seed):
        return svd_projection(g, rank, side)

    return refresh


@given(
    tall=st.booleans(),
    m=st.integers(24, 64),
    extra=st.integers(8, 64),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_randomized_and_svd_trajectories_agree_on_a_low_rank_gradient(tall, m, extra, data, seed):
    """10 steps, refreshes at steps 1 and 6 (two refreshes), tall and wide: the randomized refresh
    takes the same steps as the exact SVD to 1e-4 relative (of the distance travelled)."""
    shape = (m + extra, m) if tall else (m, m + extra)
    rank = data.draw(st.integers(2, 8))
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    gradients = low_rank_gradients(shape, rank, 10, seed)
    fast = galore_trajectory(w0, gradients, rank, gap=5, refresh=randomized(rank))
    ref = galore_trajectory(w0, gradients, rank, gap=5, refresh=exact(rank))
    for step, (a, b) in enumerate(zip(fast, ref), start=1):
        travelled = (b - w0).norm()
        assert (a - b).norm() <= 1e-4 * travelled, f"step {step}: {(a - b).norm() / travelled:.2e} relative"


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_a_rotated_basis_of_the_same_subspace_takes_other_steps(shape):
    """Why the basis matters: the same subspace, rotated, changes the trajectory by far more than
    the tolerance above (this is what the refresh returned before it finished the SVD)."""
    rank = 6
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    gradients = low_rank_gradients(shape, rank, 10, 1)
    rotation = torch.linalg.qr(torch.randn(rank, rank, generator=torch.Generator().manual_seed(2))).Q

    def rotated(g, side, seed):
        p = svd_projection(g, rank, side)
        return p @ rotation if side == "left" else rotation.T @ p

    a = galore_trajectory(w0, gradients, rank, gap=5, refresh=rotated)[-1]
    b = galore_trajectory(w0, gradients, rank, gap=5, refresh=exact(rank))[-1]
    assert (a - b).norm() > 0.05 * (b - w0).norm()


@pytest.mark.parametrize("shape", [(50, 30), (30, 50)])
def test_both_refreshes_return_the_singular_vectors_with_the_largest_entry_positive(shape):
    g = low_rank_gradients(shape, 5, 1, 3)[0]
    side = std_side(shape)
    dim = 0 if side == "left" else 1
    for proj in (randomized_range(RowShards(g), 5, side, seed=1), svd_projection(g, 5, side)):
        idx = proj.abs().argmax(dim=dim, keepdim=True)
        assert (proj.gather(dim, idx) > 0).all()
        # each vector is a singular vector of G: G G^T p = s^2 p (left) or G^T G q = s^2 q (right)
        vecs = proj if side == "left" else proj.T
        gram = g @ g.T if side == "left" else g.T @ g
        image = gram @ vecs
        values = (vecs * image).sum(0)
        torch.testing.assert_close(image, vecs * values, atol=1e-4 * values.max().item(), rtol=0)


def test_canonical_signs_flips_whole_vectors_only():
    basis = torch.tensor([[0.6, -0.8], [-0.8, -0.6]])
    out = canonical_signs(basis, dim=0)
    torch.testing.assert_close(out, torch.tensor([[-0.6, 0.8], [0.8, 0.6]]))
    torch.testing.assert_close(canonical_signs(basis.T, dim=1), out.T)
