"""``convention = "reference"``: GaLore and Fira step exactly as the released packages do.

Compared against galore-torch 1.0 (``GaLoreAdamW``) and fira 1.0.2 (``FiraAdamW``) themselves, on
the same gradients, with the exact-SVD refresh on both sides. The one thing the tests give the
packages is the sign of each singular vector: LAPACK returns an arbitrary sign, slimtrain fixes it
(largest-magnitude entry positive, ``slimtrain.registry.subspace.canonical_signs``), and Adam's moments
survive a refresh, so a sign that flips between two refreshes changes later steps. The packages'
projectors get slimtrain's convention for their SVD; everything else is their code.
"""

from __future__ import annotations

import pytest
import torch

from slimtrain.plugins.galore.projected_adamw import ProjectedAdamW
from slimtrain.registry.subspace import canonical_signs
from tests.optim import reference_packages as ref

STEPS = 12
GAP = 5  # refreshes before steps 1, 6 and 11: three refreshes
RANK = 6
LR = 0.01
EPS = 1e-6  # the packages' default; makes the eps convention visible


@pytest.fixture
def canonical_reference_signs(monkeypatch):
    """The packages' SVD refresh with slimtrain's sign convention (see the module docstring)."""
    ref.galore_adamw(), ref.fira_adamw()
    for cls in ref.projector_classes():
        original = cls.get_orthogonal_matrix

        def signed(self, weights, rank, type, _original=original):
            basis = _original(self, weights, rank, type)
            return canonical_signs(basis, dim=0 if type == "left" else 1)

        monkeypatch.setattr(cls, "get_orthogonal_matrix", signed)


def gradients(shape, seed):
    """Gradient entries of 1e-3, growing 10% a step (so Fira's limiter engages); language-model
    gradients are this small, which is where eps's place matters."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * 1e-3 * (1 + 0.1 * t) for t in range(STEPS)]


def run(make_optimizer, shape, seed):
    # entries of std 0.02, as the model's init: weights much larger than the steps would let fp32
    # rounding of W itself (not the optimizers) dominate the comparison
    w0 = 0.02 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 100))
    p = torch.nn.Parameter(w0.clone())
    opt = make_optimizer(p)
    out = []
    for g in gradients(shape, seed):
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return w0, out


def ours(method: str, convention: str, scale: float, wd: float):
    def make(p):
        group = {
            "params": [p], "proj_rank": RANK, "proj_gap": GAP, "proj_scale": scale, "proj_method": "svd",
            "proj_convention": convention,
        }
        if method == "fira":
            group.update(fira=True, fira_gamma=1.01)
        return ProjectedAdamW([group], lr=LR, eps=EPS, weight_decay=wd)

    return make


def package(method: str, scale: float, wd: float):
    def make(p):
        if method == "galore":
            group = {"params": [p], "rank": RANK, "update_proj_gap": GAP, "scale": scale, "proj_type": "std"}
            return ref.galore_adamw()([group], lr=LR, eps=EPS, weight_decay=wd)
        group = {"params": [p], "rank": RANK, "update_proj_gap": GAP, "alpha": scale, "proj_type": "std"}
        return ref.fira_adamw()([group], lr=LR, eps=EPS, weight_decay=wd)

    return make


def max_relative_gap(a_traj, b_traj, w0) -> float:
    """Largest ||a_t - b_t|| / ||b_t - w0|| over the steps: relative to the distance travelled."""
    return max(float((a - b).norm() / (b - w0).norm()) for a, b in zip(a_traj, b_traj))


CASES = [
    (method, shape, wd)
    for method in ("galore", "fira")
    for shape in ((48, 20), (20, 48))
    for wd in (0.0, 0.5)
]


@pytest.mark.parametrize("method,shape,wd", CASES)
def test_reference_convention_matches_the_released_package(canonical_reference_signs, method, shape, wd):
    scale = 0.25
    w0, mine = run(ours(method, "reference", scale, wd), shape, seed=1)
    _, theirs = run(package(method, scale, wd), shape, seed=1)
    assert max_relative_gap(mine, theirs, w0) <= 1e-5


@pytest.mark.parametrize("method,shape,wd", CASES)
def test_paper_convention_differs_from_the_package(canonical_reference_signs, method, shape, wd):
    """The three conventions are real differences (so the test above can fail): the paper mode is
    far outside its tolerance."""
    scale = 0.25
    w0, mine = run(ours(method, "paper", scale, wd), shape, seed=1)
    _, theirs = run(package(method, scale, wd), shape, seed=1)
    assert max_relative_gap(mine, theirs, w0) > 1e-3


def test_unknown_convention_is_refused_naming_the_key():
    from slimtrain.registry import ConfigError

    from slimtrain.plugins.fira import FiraConfig
    from slimtrain.plugins.galore import GaLoreConfig

    for cls, section in ((GaLoreConfig, "galore"), (FiraConfig, "fira")):
        with pytest.raises(ConfigError, match=rf"\[{section}\] convention = 'published'.*paper.*reference"):
            cls(convention="published")


@pytest.mark.parametrize("key,value", [("power_iters", -1), ("oversample", -2)])
def test_negative_refresh_settings_are_refused_naming_the_key(key, value):
    from slimtrain.registry import ConfigError

    from slimtrain.plugins.galore import GaLoreConfig

    with pytest.raises(ConfigError, match=rf"\[galore\] {key} = {value}"):
        GaLoreConfig(**{key: value})
