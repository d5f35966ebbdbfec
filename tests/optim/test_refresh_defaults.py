"""The randomized refresh's defaults stay on the exact-SVD trajectory for full-rank noisy gradients.

Exactly low-rank gradients (tests/optim/test_refresh_basis.py) are the easy case: a sketch as wide
as the rank finds the exact singular vectors. Real gradients are full rank, and Adam depends on the
basis, so a refresh that is a little off moves every later step. Here: a drifting signal of the
projection's rank (singular values 1 .. 0.1) plus noise, GaLore and Fira with the default refresh
(nothing set) against the exact SVD, 30 steps, a refresh every 5. The measured table (more noise
levels, the cost at the 1B shapes) is in docs/benchmarks/galore_refresh.md. These cases have a
spectral gap at r (noise floor 0.02-0.05 under a weakest signal direction of 0.1); where the noise
reaches the r-th singular value no basis-level goal is set (docs/methods/galore-fira.md).
"""

from __future__ import annotations

import pytest
import torch

from slimtrain.plugins.galore.projected_adamw import ProjectedAdamW
from tests.optim.noisy_gradients import drifting_noisy_gradients, max_relative_gap

STEPS, GAP = 30, 5


def trajectory(shape, grads, rank, fira, **options):
    w0 = 0.02 * torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    p = torch.nn.Parameter(w0.clone())
    group = {"params": [p], "proj_rank": rank, "proj_gap": GAP, "proj_scale": 0.25, "fira": fira, **options}
    opt = ProjectedAdamW([group], lr=0.01)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return w0, out


CASES = [  # (shape, rank, noise); noise is the noise floor's spectral norm, the signal's weakest direction is 0.1
    ((96, 64), 8, 0.02),
    ((64, 96), 8, 0.05),
    ((256, 160), 32, 0.05),
    ((160, 256), 32, 0.02),
    ((256, 384), 128, 0.05),
    ((384, 256), 128, 0.05),  # tall at l close to n: the Gram path (registry/subspace.py, gram_is_cheaper)
]


@pytest.mark.parametrize("method", ["galore", "fira"])
@pytest.mark.parametrize("shape,rank,noise", CASES)
def test_default_randomized_refresh_stays_within_1e_3_of_the_exact_svd(method, shape, rank, noise):
    grads = drifting_noisy_gradients(shape, STEPS, signal_rank=rank, noise=noise, seed=2)
    fira = method == "fira"
    w0, exact = trajectory(shape, grads, rank, fira, proj_method="svd")
    _, default = trajectory(shape, grads, rank, fira)  # the paper convention's default: randomized
    assert max_relative_gap(default, exact, w0) <= 1e-3


def test_the_former_defaults_leave_the_trajectory_on_noisy_gradients():
    """2 power iterations without oversampling (the defaults until 2026-12-06) are 5e-2 away here:
    the test above can fail."""
    shape, rank = (96, 64), 8
    grads = drifting_noisy_gradients(shape, STEPS, signal_rank=rank, noise=0.05, seed=2)
    w0, exact = trajectory(shape, grads, rank, False, proj_method="svd")
    _, former = trajectory(shape, grads, rank, False, proj_power_iters=2, proj_oversample=0)
    assert max_relative_gap(former, exact, w0) > 1e-2
