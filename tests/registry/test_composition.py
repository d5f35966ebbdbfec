"""Composition rules: every invalid composition fails before a model exists, naming the problem."""

from __future__ import annotations

import pytest
import torch

from slimtrain.registry import CompositionError, ConfigError, OptimizerHyper, StepContext, compose
from tests.registry import fakes


def test_unknown_method_lists_installed(fake_methods):
    with pytest.raises(CompositionError) as err:
        compose(["nope"], {})
    msg = str(err.value)
    assert "unknown method 'nope'" in msg
    for name in ("adamw", "fake_factor", "fake_opt"):
        assert name in msg


def test_two_parametrizations_of_same_weight(fake_methods):
    with pytest.raises(CompositionError, match="two parametrizations of the same weight.*fake_factor.*fake_factor2"):
        compose(["fake_factor", "fake_factor2"], {})


def test_disjoint_parametrizations_compose(fake_methods):
    comp = compose(
        ["fake_factor", "fake_factor2"],
        {"fake_factor": {"targets": ["wq", "wk"]}, "fake_factor2": {"targets": "w1,w2"}},
    )
    model = fakes.TinyModel()
    done = comp.apply_parametrizations(model)
    assert sorted(d.rsplit(".", 1)[-1] for d in done) == ["w1", "w1", "w2", "w2", "wk", "wk", "wq", "wq"]


def test_overlap_found_on_real_model_when_patterns_hide_it(fake_methods):
    # "attention.*" and "wq" overlap; the probe finds it before any model exists.
    with pytest.raises(CompositionError, match="wq"):
        compose(["fake_factor", "fake_factor2"], {"fake_factor": {"targets": ["attention.*"]}, "fake_factor2": {"targets": ["wq"]}})


def test_two_optimizer_methods_on_same_parameters(fake_methods):
    with pytest.raises(CompositionError, match="two optimizer methods on the same parameters.*fake_opt.*fake_opt2"):
        compose(["fake_opt", "fake_opt2"], {})


def test_optimizer_methods_on_different_roles_compose(fake_methods):
    comp = compose(["fake_opt", "fake_opt2"], {"fake_opt2": {"roles": ["A"]}})
    assert comp.method_names == ["fake_opt", "fake_opt2"]


def test_missing_requirement_says_what_to_add(fake_methods):
    with pytest.raises(CompositionError) as err:
        compose(["fake_refactor"], {})
    msg = str(err.value)
    assert "'fake_refactor' requires a factorized parametrization" in msg
    assert "fake_factor" in msg and "add one of" in msg


def test_unknown_config_key_names_key_and_allowed(fake_methods):
    with pytest.raises(ConfigError) as err:
        compose(["fake_factor"], {"fake_factor": {"rnak": 4}})
    msg = str(err.value)
    assert "[fake_factor]" in msg and "'rnak'" in msg and "rank" in msg and "targets" in msg


def test_bad_value_names_key_value_and_range(fake_methods):
    with pytest.raises(ConfigError, match=r"\[fake_factor\] rank = 0 is out of range; allowed: \[1, inf\)"):
        compose(["fake_factor"], {"fake_factor": {"rank": 0}})


def test_section_for_unlisted_unknown_method(fake_methods):
    with pytest.raises(ConfigError, match="typo_method"):
        compose(["fake_factor"], {"typo_method": {}})


def test_method_listed_twice(fake_methods):
    with pytest.raises(CompositionError, match="listed twice"):
        compose(["fake_factor", "fake_factor"], {})


def test_default_optimizer_added(fake_methods):
    assert compose(["fake_factor"], {}).method_names == ["fake_factor", "adamw"]
    assert compose(["fake_opt"], {}).method_names == ["fake_opt"]


def test_step_hooks_run_weights_stage_first_regardless_of_list_order(fake_methods):
    comp = compose(["fake_reset", "fake_factor", "fake_refactor"], {})
    comp.after_step(StepContext(step=4, model_parts=[], optimizers=[]))
    assert fakes.CALLS == ["fake_refactor@4", "fake_reset@4"]


def test_lr_factor_multiplies(fake_methods):
    comp = compose(["fake_reset"], {"fake_reset": {"every": 3}})
    assert comp.lr_factor(3) == 0.5 and comp.lr_factor(4) == 1.0


def test_param_groups_carry_options_and_roles(fake_methods):
    comp = compose(["fake_factor", "fake_opt"], {"fake_factor": {"targets": ["wq"]}, "fake_opt": {"roles": ["A"]}})
    model = fakes.TinyModel()
    comp.apply_parametrizations(model)
    groups = comp.param_groups(model)
    projected = [g for g in groups if g.get("projected")]
    assert len(projected) == 1
    # exactly the A factors of the two wq layers (rank 2 x dim 8)
    assert [tuple(p.shape) for p in projected[0]["params"]] == [(2, 8), (2, 8)]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len([p for p in model.parameters() if p.requires_grad])
    opt = comp.build_optimizer(groups, OptimizerHyper(lr=0.1))
    assert {g["rule"] for g in opt.param_groups} == {"fake_opt", "adamw"}
    assert [g["rule"] for g in opt.param_groups if g.get("projected")] == ["fake_opt"]


def test_conflicting_group_options_raise(fake_methods):
    comp = compose(["fake_opt", "fake_clash"], {})
    with pytest.raises(CompositionError, match="'projected'"):
        comp.param_groups(fakes.TinyModel())


def test_targets_matching_nothing_list_candidates(fake_methods):
    comp = compose(["fake_factor"], {"fake_factor": {"targets": ["q_proj"]}})
    with pytest.raises(ConfigError) as err:
        comp.apply_parametrizations(fakes.TinyModel())
    msg = str(err.value)
    assert "q_proj" in msg and "wq" in msg and "w3" in msg


def test_parametrized_weight_keeps_dense_view_and_init(fake_methods):
    comp = compose(["fake_factor"], {"fake_factor": {"targets": ["wq"]}})
    model = fakes.TinyModel()
    comp.apply_parametrizations(model)
    comp.init_parametrized(model)
    wq = model.layers["0"].attention.wq
    B, A = wq.parametrizations.weight.original0, wq.parametrizations.weight.original1
    assert B.abs().sum() > 0 and A.abs().sum() > 0
    x = torch.randn(3, 8)
    torch.testing.assert_close(wq(x), x @ (B @ A).T)
    torch.testing.assert_close(wq.weight, B @ A)


def test_builtin_refactorization_requirement_names_factorized_builtins(fresh_registry):
    assert "refactorization" in fresh_registry.get_methods()
    with pytest.raises(CompositionError) as err:
        compose(["refactorization"], {})
    for name in ("low_rank", "lora", "sltrain"):
        assert name in str(err.value)


# -- the same rules with the built-in methods ---------------------------------------------------
def test_builtin_galore_and_fira_are_two_optimizers_on_the_same_parameters(fresh_registry):
    with pytest.raises(CompositionError, match="two optimizer methods on the same parameters: 'galore' and 'fira'"):
        compose(["galore", "fira"], {})
    # adamw is the default rule: listed next to galore it takes what galore does not select
    assert compose(["adamw", "galore"], {}).method_names == ["adamw", "galore"]


@pytest.mark.parametrize(
    "methods, sections, needle",
    [
        (["galore"], {"galore": {"targets": ["nomatch"], "rank": 2}}, "candidate layer names: output, w1, w2, w3, wk, wo, wq, wv"),
        (["galore"], {"galore": {"roles": ["A"], "rank": 2}}, "the targeted layers have roles: weight"),
        (["lora", "galore"], {"lora": {"rank": 2}, "galore": {"rank": 2}}, "the targeted layers have roles: A, B, W0 (frozen)"),
    ],
)
def test_optimizer_selection_matching_nothing_is_an_error(fresh_registry, methods, sections, needle):
    comp = compose(methods, sections)
    model = fakes.TinyModel()
    comp.apply_parametrizations(model)
    with pytest.raises(ConfigError) as err:
        comp.param_groups(model)
    assert "[galore] selects no trainable parameter of the model" in str(err.value)
    assert needle in str(err.value)


def test_galore_on_lora_factors_is_valid(fresh_registry):
    comp = compose(["lora", "galore"], {"lora": {"rank": 2}, "galore": {"rank": 2, "roles": ["B", "A"]}})
    model = fakes.TinyModel()
    comp.apply_parametrizations(model)
    projected = [g for g in comp.param_groups(model) if g["rule"] == "galore"]
    assert sum(len(g["params"]) for g in projected) == 2 * 14


def test_wrapper_segments_do_not_change_names(fake_methods):
    from slimtrain.registry.parametrization import canonical_name

    assert canonical_name("layers.0._checkpoint_wrapped_module.attention._orig_mod.wq") == "layers.0.attention.wq"
