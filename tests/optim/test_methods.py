"""galore / fira / momentum_reset as registered methods: configs, bad input, param groups, memory,
momentum reset and its LR re-warm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimtrain.registry import (
    Capability,
    ConfigError,
    HookStage,
    OptimizerHyper,
    ParamSpec,
    StepContext,
    compose,
    llama_dense_specs,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(16, 16, bias=False)
        self.w1 = nn.Linear(16, 40, bias=False)
        self.w2 = nn.Linear(40, 16, bias=True)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(self.wq(self.norm(x)))))


def model():
    torch.manual_seed(0)
    return Block()


# -- registration and composition -----------------------------------------------------------------
def test_methods_are_registered_with_their_capabilities():
    from slimtrain.registry import get_methods

    methods = get_methods()
    assert methods["galore"].cls.provides == {Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE}
    assert methods["fira"].cls.provides == {Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE}
    mr = methods["momentum_reset"].cls
    assert mr.provides == {Capability.STEP_HOOK, Capability.LR_SCHEDULE}
    assert mr.hook_stage == HookStage.OPTIMIZER_STATE
    assert "projected_adamw" not in methods  # the shared optimizer is not a method


def test_galore_param_groups_project_selected_weights_only():
    from slimtrain.plugins.galore import ProjectionRule
    from slimtrain.registry.composed_optimizer import ComposedOptimizer

    comp = compose(["galore"], {"galore": {"rank": 8, "update_proj_gap": 5}})
    m = model()
    groups = comp.param_groups(m)
    projected = [g for g in groups if g["rule"] == "galore"]
    assert len(projected) == 1
    assert {id(p) for p in projected[0]["params"]} == {id(m.wq.weight), id(m.w1.weight), id(m.w2.weight)}
    opt = comp.build_optimizer(groups, OptimizerHyper(lr=0.01))
    assert isinstance(opt, ComposedOptimizer)
    rule = opt.rules["galore"]
    assert isinstance(rule, ProjectionRule) and (rule.rank, rule.gap, rule.fira) == (8, 5, False)
    m(torch.randn(4, 16)).sum().backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    assert opt.state[m.w1.weight]["exp_avg"].shape == (40, 8)  # 40 x 16: right side, m x r
    assert opt.state[m.w2.weight]["exp_avg"].shape == (8, 40)  # 16 x 40: left side, r x n
    assert opt.state[m.norm.weight]["exp_avg"].shape == (16,)  # plain AdamW
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters())


def test_fira_rule_carries_the_residual_options():
    rule = compose(["fira"], {"fira": {"rank": 4, "gamma": 1.05}}).method("fira").update_rule()
    assert rule.fira is True and rule.gamma == 1.05 and rule.scale == 0.25 and rule.method == "fira"


def test_galore_on_factors_selects_the_role_it_is_given():
    cfg = compose(["galore"], {"galore": {"roles": "A", "rank": 4}}).method("galore")
    a = ParamSpec("l.wq.parametrizations.weight.original1", "l.wq", "A", (8, 64), method="low_rank", is_linear=True)
    b = ParamSpec("l.wq.parametrizations.weight.original0", "l.wq", "B", (64, 8), method="low_rank", is_linear=True)
    assert cfg.selects(a) and not cfg.selects(b)


def test_galore_on_low_rank_factors_composes_when_low_rank_is_installed():
    comp = compose(["low_rank", "galore"], {"low_rank": {"rank": 8, "targets": ["w1", "w2"]}, "galore": {"roles": ["A"], "rank": 4, "targets": ["w1", "w2"]}})
    m = model()
    comp.apply_parametrizations(m)
    groups = comp.param_groups(m)
    projected = [g for g in groups if g["rule"] == "galore"]
    assert len(projected) == 1 and len(projected[0]["params"]) == 2
    assert all(p.shape[0] == 8 for p in projected[0]["params"])  # the A factors, r x n


def test_galore_and_fira_cannot_both_project_the_same_weights():
    from slimtrain.registry import CompositionError

    with pytest.raises(CompositionError, match="two optimizer methods"):
        compose(["galore", "fira"])


# -- memory ---------------------------------------------------------------------------------------
def test_galore_memory_matches_the_published_1b_figure():
    specs = llama_dense_specs(2048, 5461, 24, 32000, 32)
    for name in ("galore", "fira"):
        est = compose([name], {name: {"rank": 512}}).estimate_memory(specs)
        assert round(est.total_bytes / 1e9, 2) == 4.76


def test_state_elements_per_matrix():
    from slimtrain.registry.memory import optimizer_state_elements

    comp = compose(["galore"], {"galore": {"rank": 4}})
    wide = ParamSpec("a.w2.weight", "a.w2", "weight", (16, 40), is_linear=True)
    norm = ParamSpec("a.norm.weight", "a.norm", "weight", (16,))
    assert comp.rule_for(wide).state_elements(wide) == 2 * 4 * 40 + 4 * 16
    assert comp.rule_for(norm).state_elements(norm) == 32  # the default AdamW rule
    assert optimizer_state_elements(comp, [wide, norm]) == 2 * 4 * 40 + 4 * 16 + 32


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["galore", "fira"])
@pytest.mark.parametrize(
    "key,value,allowed",
    [("rank", 0, "[1, inf)"), ("rank", -3, "[1, inf)"), ("update_proj_gap", 0, "[1, inf)"), ("scale", 0.0, "(0, inf)"), ("scale", -1.0, "(0, inf)")],
)
def test_bad_projection_settings_name_key_value_and_range(method, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        compose([method], {method: {key: value}})
    msg = str(err.value)
    assert f"[{method}] {key} = {value!r}" in msg and allowed in msg


@given(rank=st.integers(17, 500))
def test_rank_above_the_matrix_dimension_names_the_parameter_and_shape(rank):
    comp = compose(["galore"], {"galore": {"rank": rank, "targets": ["wq"]}})  # wq is 16 x 16
    with pytest.raises(ConfigError) as err:
        comp.param_groups(model())
    msg = str(err.value)
    assert f"rank = {rank}" in msg and "wq.weight" in msg and "16 x 16" in msg and "[1, 16]" in msg


def test_bad_proj_method_and_momentum_reset_settings():
    with pytest.raises(ConfigError, match="proj_method = 'qr'.*'randomized', 'svd'"):
        compose(["galore"], {"galore": {"proj_method": "qr"}})
    with pytest.raises(ConfigError, match=r"\[momentum_reset\] every = 0 .*\[1, inf\)"):
        compose(["momentum_reset"], {"momentum_reset": {"every": 0}})
    with pytest.raises(ConfigError, match=r"warmup_start = 1.5 .*\[0.0, 1.0\]"):
        compose(["momentum_reset"], {"momentum_reset": {"warmup_start": 1.5}})
    with pytest.raises(ConfigError, match=r"\[fira\] gamma = 0.9"):
        compose(["fira"], {"fira": {"gamma": 0.9}})


# -- momentum reset -------------------------------------------------------------------------------
class Container:
    """Stands in for torchtitan's OptimizersContainer (which holds ``.optimizers``)."""

    def __init__(self, optimizers):
        self.optimizers = optimizers


@pytest.mark.parametrize("recipe", [["momentum_reset"], ["galore", "momentum_reset"], ["fira", "momentum_reset"]])
def test_momentum_reset_zeroes_moments_and_leaves_params(recipe):
    sections = {"momentum_reset": {"every": 3}, "galore": {"rank": 4}, "fira": {"rank": 4}}
    comp = compose(recipe, {k: v for k, v in sections.items() if k in recipe})
    m = model()
    opt = comp.build_optimizer(comp.param_groups(m), OptimizerHyper(lr=0.01))
    for step in (1, 2, 3):
        m(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 3:
            before = {n: p.detach().clone() for n, p in m.named_parameters()}
            projs = {id(p): s["proj"].clone() for p, s in opt.state.items() if "proj" in s}
            assert any(s["exp_avg"].abs().sum() > 0 for s in opt.state.values())
        comp.after_step(StepContext(step=step, model_parts=[m], optimizers=Container([opt])))
        if step < 3:
            assert all(s["exp_avg"].abs().sum() > 0 for s in opt.state.values())
    for p, s in opt.state.items():
        assert s["exp_avg"].abs().sum() == 0 and s["exp_avg_sq"].abs().sum() == 0
        assert s["step"] == 0
        if "proj" in s:
            assert torch.equal(s["proj"], projs[id(p)])  # projections are not moments
        if "fira_prev" in s:
            assert s["fira_prev"] == -1.0  # the limiter starts unlimited again, as a new optimizer
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])


def test_momentum_reset_of_chosen_params_only_and_keeping_the_step():
    comp = compose(["momentum_reset"], {"momentum_reset": {"every": 1, "targets": ["w1", "w2"], "roles": ["weight"], "reset_step": False}})
    m = model()
    opt = comp.build_optimizer(comp.param_groups(m), OptimizerHyper(lr=0.01))
    m(torch.randn(4, 16)).pow(2).mean().backward()
    opt.step()
    comp.after_step(StepContext(step=1, model_parts=[m], optimizers=[opt]))
    for name, p in m.named_parameters():
        s = opt.state[p]
        chosen = name in ("w1.weight", "w2.weight")
        assert (s["exp_avg"].abs().sum() == 0) == chosen, name
        assert s["step"] == 1


def test_lr_rewarm_follows_its_schedule():
    mr = compose(["momentum_reset"], {"momentum_reset": {"every": 100, "warmup_steps": 10, "warmup_start": 0.001}}).method(
        "momentum_reset"
    )
    assert [mr.lr_factor(s) for s in (1, 50, 99, 100)] == [1.0] * 4
    ramp = [mr.lr_factor(100 + k) for k in range(1, 12)]
    expected = [0.001 + 0.999 * (k - 1) / 10 for k in range(1, 11)] + [1.0]
    assert ramp == pytest.approx(expected)
    assert mr.lr_factor(201) == pytest.approx(0.001) and mr.lr_factor(250) == 1.0
    no_warm = compose(["momentum_reset"], {"momentum_reset": {"every": 5, "warmup_steps": 0}}).method("momentum_reset")
    assert all(no_warm.lr_factor(s) == 1.0 for s in range(1, 30))


def test_lr_factor_multiplies_into_the_composition():
    comp = compose(["galore", "momentum_reset"], {"momentum_reset": {"every": 4, "warmup_steps": 2, "warmup_start": 0.1}})
    assert [comp.lr_factor(s) for s in range(1, 9)] == pytest.approx([1, 1, 1, 1, 0.1, 0.55, 1, 1])
