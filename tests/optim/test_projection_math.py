"""GaLore / Fira step math against AdamW and against the papers' equations written out here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimtrain.plugins.galore.projected_adamw import ProjectedAdamW
from slimtrain.registry.sharded import RowShards as _Rows
from slimtrain.registry.subspace import normalize_basis as _normalize, randomized_range, std_side, svd_projection

BETAS = (0.9, 0.999)


class FixedProjection(ProjectedAdamW):
    """ProjectedAdamW whose refresh returns a given matrix (P, m x r, or Q, r x n)."""

    def __init__(self, params, fixed: torch.Tensor, **kw):
        super().__init__(params, **kw)
        self.fixed = fixed
        self.refreshes = 0

    def compute_projection(self, group, rows, side, seed):
        self.refreshes += 1
        return self.fixed.clone()


def group(p, rank, scale=1.0, gap=200, **extra):
    return [{"params": [p], "proj_rank": rank, "proj_gap": gap, "proj_scale": scale, **extra}]


def orthonormal(d: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q.float()


def grads(shape, steps, seed, growth=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * growth**t for t in range(steps)]


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (7, 7)])
def test_identity_projection_scale_one_is_adamw(shape):
    w0 = torch.randn(*shape)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    side = std_side(shape)
    eye = torch.eye(shape[0] if side == "left" else shape[1])
    ours = FixedProjection(group(p, min(shape)), eye, lr=0.01, weight_decay=0.1)
    ref = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, foreach=False)
    for gr in grads(shape, 4, 0):
        p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@given(
    m=st.integers(2, 12), n=st.integers(2, 12), data=st.data(), seed=st.integers(0, 2**16),
    scale=st.floats(0.05, 2.0),
)
def test_update_is_scale_p_adam_of_projected_gradient(m, n, data, seed, scale):
    r = data.draw(st.integers(1, min(m, n)))
    side = std_side((m, n))
    basis = orthonormal(m if side == "left" else n, r, seed)
    fixed = basis if side == "left" else basis.T.contiguous()
    w0 = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1))
    p = torch.nn.Parameter(w0.clone())
    opt = FixedProjection(group(p, r, scale), fixed, lr=1.0, eps=1e-8)
    g = grads((m, n), 1, seed + 2)[0]
    p.grad = g.clone()
    opt.step()
    update = w0 - p.detach()
    # Adam's first step on R is R / (|R| + eps) elementwise (bias-corrected moments are R and R^2)
    if side == "left":
        low = basis.T @ g
        expected = scale * basis @ (low / (low.abs() + 1e-8))
        in_span = basis @ (basis.T @ update)
    else:
        low = g @ basis
        expected = scale * (low / (low.abs() + 1e-8)) @ basis.T
        in_span = (update @ basis) @ basis.T
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(in_span, update, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])
def test_galore_steps_follow_the_paper_equations(shape):
    """GaLore Algorithm 2 with a fixed projection, three steps, decoupled weight decay."""
    m, n = shape
    r, scale, lr, wd, eps = 3, 0.25, 0.05, 0.1, 1e-8
    b1, b2 = BETAS
    left = m < n
    basis = orthonormal(m if left else n, r, 7)
    fixed = basis if left else basis.T.contiguous()
    w = torch.randn(m, n, dtype=torch.float64)
    p = torch.nn.Parameter(w.float().clone())
    opt = FixedProjection(group(p, r, scale), fixed, lr=lr, weight_decay=wd, eps=eps)
    P = basis.double()
    M = V = None
    for t, g in enumerate(grads(shape, 3, 3), start=1):
        p.grad = g.clone()
        opt.step()
        G = g.double()
        R = P.T @ G if left else G @ P
        M = (1 - b1) * R if M is None else b1 * M + (1 - b1) * R
        V = (1 - b2) * R**2 if V is None else b2 * V + (1 - b2) * R**2
        N = (M / (1 - b1**t)) / (torch.sqrt(V / (1 - b2**t)) + eps)
        G_tilde = scale * (P @ N if left else N @ P.T)
        w = w * (1 - lr * wd) - lr * G_tilde
    torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    assert opt.refreshes == 1  # the fixed projection was set once, at the first step


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])
def test_fira_steps_follow_the_paper_equations(shape):
    """Fira with a fixed projection, as the paper states it: the bias-corrected Adam direction N,
    S = phi (G - P R) with phi from N, and the limiter on the norm of that S, the scaled residual
    the update applies (the released code limits the residual before the bias correction: see
    docs/methods/galore-fira.md). eps = 0; gradients that grow so the limiter engages."""
    m, n = shape
    r, alpha, lr, gamma = 3, 0.25, 0.05, 1.01
    b1, b2 = BETAS
    left = m < n
    basis = orthonormal(m if left else n, r, 11)
    fixed = basis if left else basis.T.contiguous()
    w = torch.randn(m, n, dtype=torch.float64)
    p = torch.nn.Parameter(w.float().clone())
    opt = FixedProjection(group(p, r, alpha, fira=True, fira_gamma=gamma), fixed, lr=lr, eps=0.0)
    P = basis.double()
    M = V = prev = None
    limited = 0
    for t, g in enumerate(grads(shape, 8, 5, growth=1.5), start=1):
        p.grad = g.clone()
        opt.step()
        G = g.double()
        R = P.T @ G if left else G @ P
        M = (1 - b1) * R if M is None else b1 * M + (1 - b1) * R
        V = (1 - b2) * R**2 if V is None else b2 * V + (1 - b2) * R**2
        N = (M / (1 - b1**t)) / torch.sqrt(V / (1 - b2**t))
        dim = 0 if left else 1
        phi = torch.linalg.vector_norm(N, dim=dim, keepdim=True) / (torch.linalg.vector_norm(R, dim=dim, keepdim=True) + 1e-8)
        residual = G - (P @ R if left else R @ P.T)
        S = residual * phi
        if prev is not None:
            ratio = torch.linalg.norm(S) / (prev + 1e-8)
            if ratio > gamma:
                limited += 1
                S = S / (ratio / gamma)
        prev = torch.linalg.norm(S)
        update = alpha * (P @ N if left else N @ P.T) + S
        w = w - lr * update
    assert limited >= 2, "the test should exercise the limiter"
    torch.testing.assert_close(p.detach().double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 11), (11, 6)])
@pytest.mark.parametrize("method", ["randomized", "svd"])
def test_fira_at_full_rank_equals_galore(shape, method):
    w0 = torch.randn(*shape)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    r = min(shape)
    fira = ProjectedAdamW(group(p, r, 0.25, gap=2, fira=True, proj_method=method), lr=0.01)
    galore = ProjectedAdamW(group(q, r, 0.25, gap=2, proj_method=method), lr=0.01)
    for g in grads(shape, 5, 9):
        p.grad, q.grad = g.clone(), g.clone()
        fira.step()
        galore.step()
    assert fira.state[p]["fira_prev"] < 1e-4  # the residual is (numerically) zero
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_fira_below_full_rank_differs_from_galore():
    """Guards the previous test: with rank < min(m, n) the residual term does change the update."""
    w0 = torch.randn(6, 11)
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    fira = ProjectedAdamW(group(p, 2, 0.25, fira=True), lr=0.01)
    galore = ProjectedAdamW(group(q, 2, 0.25), lr=0.01)
    g = torch.randn(6, 11)
    p.grad, q.grad = g.clone(), g.clone()
    fira.step()
    galore.step()
    assert (p - q).abs().max() > 1e-4


@given(
    m=st.integers(4, 40), n=st.integers(4, 40), data=st.data(), seed=st.integers(0, 2**16),
    power_iters=st.integers(0, 2),
)
def test_range_finder_recovers_the_subspace_of_a_low_rank_gradient(m, n, data, seed, power_iters):
    r = data.draw(st.integers(1, min(m, n)), label="rank")
    k = data.draw(st.integers(1, r), label="gradient rank")
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, k, generator=gen) @ torch.randn(k, n, generator=gen)
    side = std_side((m, n))
    proj = randomized_range(_Rows(g), r, side, power_iters=power_iters, seed=seed)
    if side == "left":
        assert proj.shape == (m, r)
        basis = proj
        rebuilt = basis @ (basis.T @ g)
    else:
        assert proj.shape == (r, n)
        basis = proj.T
        rebuilt = (g @ basis) @ basis.T
    torch.testing.assert_close(basis.T @ basis, torch.eye(r), rtol=0, atol=1e-4)
    assert torch.linalg.norm(rebuilt - g) <= 1e-4 * torch.linalg.norm(g)
    # the leading k directions are the gradient's singular subspace (as exact SVD finds it), when
    # that subspace is well defined numerically
    svals = torch.linalg.svdvals(g.double())
    if svals[k - 1] > 1e-3 * svals[0]:
        exact = svd_projection(g, k, side)
        exact_basis = exact if side == "left" else exact.T
        lead = basis[:, :k]
        torch.testing.assert_close(lead @ lead.T, exact_basis @ exact_basis.T, rtol=0, atol=2e-3)


@given(d=st.integers(2, 48), data=st.data(), seed=st.integers(0, 2**16))
def test_lu_normalizer_keeps_the_column_space_and_undoes_the_grading(d, data, seed):
    """The power-iteration re-basing: ``P L`` spans exactly what ``y`` spans (a wrong row
    permutation fails here), has unit-bounded entries, and is well conditioned even when ``y``'s
    singular values span 8 decades (what power iterations produce)."""
    l = data.draw(st.integers(1, d), label="columns")
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, l, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(l, l, generator=gen, dtype=torch.float64)).Q
    y = u @ torch.diag(torch.logspace(0, -8, l, dtype=torch.float64)) @ v
    basis = _normalize(y, "lu")
    assert basis.shape == (d, l)
    assert basis.abs().max() <= 1.0 + 1e-12
    q_b = torch.linalg.qr(basis).Q
    torch.testing.assert_close(q_b @ q_b.T, u @ u.T, rtol=0, atol=1e-6)
    assert torch.linalg.cond(basis) < 1e4


def test_refresh_of_an_all_zero_gradient_is_still_an_orthonormal_basis():
    """torch.distributed.checkpoint initializes optimizer state by stepping on zero gradients."""
    for shape in ((6, 10), (10, 6)):
        side = std_side(shape)
        proj = randomized_range(_Rows(torch.zeros(shape)), 3, side, power_iters=2, seed=0)
        basis = proj if side == "left" else proj.T
        assert torch.isfinite(basis).all()
        torch.testing.assert_close(basis.T @ basis, torch.eye(3), rtol=0, atol=1e-5)


def test_an_unknown_normalizer_is_refused():
    with pytest.raises(ValueError, match="normalizer = 'cholesky'; allowed: lu, qr"):
        randomized_range(_Rows(torch.randn(6, 10)), 3, "left", normalizer="cholesky")


def test_lu_and_qr_normalizers_give_the_same_refresh():
    """Re-basing between iterations changes the basis, never the subspace, so the refresh agrees."""
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(40, 12, generator=gen) @ torch.diag(torch.logspace(0, -3, 12)) @ torch.randn(12, 70, generator=gen)
    for shape_g in (g, g.T.contiguous()):
        side = std_side(tuple(shape_g.shape))
        a = randomized_range(_Rows(shape_g), 6, side, power_iters=2, seed=5, normalizer="lu")
        b = randomized_range(_Rows(shape_g), 6, side, power_iters=2, seed=5, normalizer="qr")
        a, b = (a, b) if side == "left" else (a.T, b.T)
        torch.testing.assert_close(a @ a.T, b @ b.T, rtol=0, atol=1e-4)


def test_range_finder_matches_svd_top_subspace_with_a_spectral_gap():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 64, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(96, 96, generator=gen)).Q
    s = torch.cat([torch.linspace(10, 5, 8), torch.full((56,), 0.05)])
    g = u @ torch.diag(s) @ v[:, :64].T
    for shape_g in (g, g.T.contiguous()):
        side = std_side(tuple(shape_g.shape))
        a = randomized_range(_Rows(shape_g), 8, side, power_iters=2, seed=1)
        b = svd_projection(shape_g, 8, side)
        a, b = (a, b) if side == "left" else (a.T, b.T)
        assert torch.linalg.norm(a @ a.T - b @ b.T) < 1e-3


def test_refresh_every_gap_steps_without_resetting_moments():
    p = torch.nn.Parameter(torch.randn(6, 10))
    opt = ProjectedAdamW(group(p, 2, gap=3), lr=0.01)
    projs, moments = [], []
    for g in grads((6, 10), 7, 4):
        p.grad = g
        opt.step()
        projs.append(opt.state[p]["proj"].clone())
        moments.append(opt.state[p]["exp_avg"].clone())
    same = [torch.equal(projs[i], projs[i - 1]) for i in range(1, 7)]
    # refreshed before steps 1, 4, 7 (step count 0, 3, 6 is a multiple of the gap)
    assert same == [True, True, False, True, True, False]
    # the first moment right after a refresh still carries the old momentum (not reset)
    low = projs[3].T @ grads((6, 10), 7, 4)[3]
    assert not torch.allclose(moments[3], 0.1 * low)


def test_plain_groups_are_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(4))
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    w = torch.nn.Parameter(torch.randn(6, 8))
    ours = ProjectedAdamW([{"params": [a, b]}, *group(w, 2)], lr=0.02, weight_decay=0.05)
    ref = torch.optim.AdamW([a2, b2], lr=0.02, weight_decay=0.05)
    for _ in range(3):
        for x, y in ((a, a2), (b, b2)):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        w.grad = torch.randn_like(w)
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), a2.detach())
    torch.testing.assert_close(b.detach(), b2.detach())


def test_state_holds_only_tensors():
    p = torch.nn.Parameter(torch.randn(6, 10))
    q = torch.nn.Parameter(torch.randn(10, 6))
    opt = ProjectedAdamW([*group(p, 2, fira=True), *group(q, 3)], lr=0.01)
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    for state in opt.state.values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert opt.state[p]["exp_avg"].shape == (2, 10) and opt.state[p]["proj"].shape == (6, 2)
    assert opt.state[q]["exp_avg"].shape == (10, 3) and opt.state[q]["proj"].shape == (3, 6)
