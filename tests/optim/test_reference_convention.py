"""``convention = "reference"``: GaLore and Fira step as the released packages do, as shipped.

Compared against galore-torch 1.0 (``GaLoreAdamW``) and fira 1.0.2 (``FiraAdamW``) themselves,
unpatched, on the same full-rank noisy gradients (a drifting low-rank signal plus noise,
tests/optim/noisy_gradients.py): 96 x 64 and 64 x 96, rank 8, a refresh every 5 steps, 30 steps,
weight decay 0 and 0.1. Our side sets nothing but the convention: its refresh then defaults to the
packages' full SVD with torch.linalg.svd's own signs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from slimtrain.plugins.galore.projected_adamw import ProjectedAdamW
from tests.optim import reference_packages as ref
from tests.optim.noisy_gradients import drifting_noisy_gradients, max_relative_gap

STEPS = 30
GAP = 5  # refreshes before steps 1, 6, 11, ..., 26: six refreshes
RANK = 8
LR = 0.01
EPS = 1e-6  # the packages' default; makes the eps convention visible
SHAPES = ((96, 64), (64, 96))


def gradients(shape, seed):
    """Full rank (signal of rank 16 under a noise floor of 0.3), growing 5% a step so Fira's
    limiter engages."""
    return drifting_noisy_gradients(shape, STEPS, signal_rank=16, noise=0.3, seed=seed, growth=0.05)


def run(make_optimizer, shape, seed):
    # entries of std 0.02, as the model's init: weights much larger than the steps would let fp32
    # rounding of W itself (not the optimizers) dominate the comparison
    w0 = 0.02 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 100))
    p = torch.nn.Parameter(w0.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the packages' AdamW deprecation notice
        opt = make_optimizer(p)
    out = []
    for g in gradients(shape, seed):
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return w0, out


def ours(method: str, convention: str, scale: float, wd: float, **options):
    def make(p):
        group = {
            "params": [p], "proj_rank": RANK, "proj_gap": GAP, "proj_scale": scale, "proj_convention": convention,
            **options,
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


CASES = [(method, shape, wd) for method in ("galore", "fira") for shape in SHAPES for wd in (0.0, 0.1)]


@pytest.mark.parametrize("method,shape,wd", CASES)
def test_reference_convention_matches_the_unpatched_package(method, shape, wd):
    """Measured 2026-12-06 (CPU, torch 2.13): at most 1.4e-6 relative to the distance travelled."""
    scale = 0.25
    w0, mine = run(ours(method, "reference", scale, wd), shape, seed=1)
    _, theirs = run(package(method, scale, wd), shape, seed=1)
    assert max_relative_gap(mine, theirs, w0) <= 1e-5


@pytest.mark.parametrize("method,shape", [(m, s) for m in ("galore", "fira") for s in SHAPES])
def test_canonical_signs_would_leave_the_package_trajectory(method, shape):
    """Why the reference convention keeps LAPACK's signs: on these gradients a refresh's singular
    vectors flip sign between refreshes, and the surviving moments make that a different trajectory
    (the test above can fail)."""
    scale = 0.25
    w0, mine = run(ours(method, "reference", scale, 0.0, proj_canonical_signs=True), shape, seed=1)
    _, theirs = run(package(method, scale, 0.0), shape, seed=1)
    assert max_relative_gap(mine, theirs, w0) > 1e-2


@pytest.mark.parametrize("method,shape,wd", CASES)
def test_paper_convention_differs_from_the_package(method, shape, wd):
    """The conventions are real differences: the paper mode (even with the exact SVD) is far
    outside the tolerance above."""
    scale = 0.25
    w0, mine = run(ours(method, "paper", scale, wd, proj_method="svd"), shape, seed=1)
    _, theirs = run(package(method, scale, wd), shape, seed=1)
    assert max_relative_gap(mine, theirs, w0) > 1e-3


@pytest.mark.parametrize("section", ["galore", "fira"])
def test_reference_convention_refuses_the_randomized_refresh_naming_both_keys(section):
    from slimtrain.plugins.fira import FiraConfig
    from slimtrain.plugins.galore import GaLoreConfig
    from slimtrain.registry import ConfigError

    cls = GaLoreConfig if section == "galore" else FiraConfig
    with pytest.raises(ConfigError, match=rf"\[{section}\] proj_method = 'randomized' contradicts convention = 'reference'"):
        cls(convention="reference", proj_method="randomized")
    assert cls(convention="reference").proj_method == "auto"  # nothing else needed


def test_auto_refresh_is_the_exact_svd_under_reference_and_randomized_under_paper():
    from slimtrain.plugins.galore import ProjectionRule

    ref_rule = ProjectionRule("galore", rank=4, gap=5, scale=0.25, convention="reference")
    paper_rule = ProjectionRule("galore", rank=4, gap=5, scale=0.25)
    assert (ref_rule.proj_method, ref_rule.canonical_signs) == ("svd", False)
    assert (paper_rule.proj_method, paper_rule.canonical_signs) == ("randomized", True)


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


@pytest.mark.parametrize("method", ["galore", "fira"])
@pytest.mark.parametrize("key,value", [("power_iters", 4), ("oversample", 0), ("proj_method", "randomized")])
def test_a_randomized_refresh_setting_under_reference_is_refused_by_the_composition(method, key, value):
    """The reference refreshes by the package's exact SVD, so a randomized-refresh setting would be
    silently ignored: the composition (what runs before the model is built) refuses it, naming the
    method, the key, the value and why. Values as the TOML/CLI give them (strings) are coerced first."""
    from slimtrain.registry import ConfigError, compose

    package = "galore-torch 1.0" if method == "galore" else "fira 1.0.2"
    for raw in (value, str(value)):
        with pytest.raises(ConfigError) as err:
            compose([method], {method: {"convention": "reference", key: raw}})
        msg = str(err.value)
        assert msg.startswith(f"[{method}] {key} = {value!r} contradicts convention = 'reference'"), msg
        assert f"the released {package} refreshes by its exact SVD" in msg, msg
    # the same settings under the paper convention, and the reference with them unset, compose
    compose([method], {method: {"convention": "paper", key: value}})
    compose([method], {method: {"convention": "reference"}})
