"""The composed optimizer: several optimizer methods in one optimizer, declared state (dtype through
load_state_dict, resets, undeclared state), the true step, and the bad input the issue lists."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from slimtrain.registry import (
    Capability,
    CompositionError,
    ConfigError,
    Method,
    OptimizerHyper,
    ParamSpec,
    compose,
    llama_dense_specs,
)
from slimtrain.registry.composed_optimizer import ComposedOptimizer
from slimtrain.registry.update_rule import OnReset, StateSpec, UpdateRule


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(16, 16, bias=False)
        self.wo = nn.Linear(16, 16, bias=False)


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(16, 40, bias=False)
        self.w2 = nn.Linear(40, 16, bias=False)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.feed_forward = FeedForward()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        a = self.attention.wo(self.attention.wq(self.norm(x)))
        return self.feed_forward.w2(torch.relu(self.feed_forward.w1(a)))


def block(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Block().to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, generator=g).to(dtype) for _ in range(n)]


TWO = (
    ["galore", "fira"],
    {"galore": {"rank": 4, "update_proj_gap": 2, "targets": ["attention.*"]},
     "fira": {"rank": 4, "update_proj_gap": 2, "targets": ["feed_forward.*"]}},
)


def train(comp, model, xs, opt=None, hyper=OptimizerHyper(lr=0.01, weight_decay=0.1)):
    opt = opt or comp.build_optimizer(comp.param_groups(model), hyper)
    for x in xs:
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


# -- several optimizer methods in one optimizer -------------------------------------------------------
def test_galore_on_attention_and_fira_on_the_mlp_each_step_their_own_parameters():
    from slimtrain.plugins.galore.projected_adamw import ProjectedAdamW

    comp = compose(*TWO)
    m = block()
    opt = train(comp, m, batches(3))
    owner = {id(p): g["rule"] for g in opt.param_groups for p in g["params"]}
    assert owner[id(m.attention.wq.weight)] == owner[id(m.attention.wo.weight)] == "galore"
    assert owner[id(m.feed_forward.w1.weight)] == owner[id(m.feed_forward.w2.weight)] == "fira"
    assert owner[id(m.norm.weight)] == owner[id(m.norm.bias)] == "adamw"
    assert "fira_prev" in opt.state[m.feed_forward.w1.weight] and "fira_prev" not in opt.state[m.attention.wq.weight]
    # each parameter's numbers are those of its own rule run alone (ProjectedAdamW: one rule per group)
    ref = block()
    ref_opt = ProjectedAdamW(
        [
            {"params": [ref.attention.wq.weight, ref.attention.wo.weight], "proj_rank": 4, "proj_gap": 2, "proj_scale": 0.25},
            {"params": [ref.feed_forward.w1.weight, ref.feed_forward.w2.weight], "proj_rank": 4, "proj_gap": 2,
             "proj_scale": 0.25, "fira": True},
            {"params": [ref.norm.weight, ref.norm.bias]},
        ],
        lr=0.01, weight_decay=0.1, foreach=True,
    )
    # same seeds for the randomized refresh: group and parameter positions agree
    assert [g["rule"] for g in opt.param_groups] == ["galore", "fira", "adamw"]
    train(None, ref, batches(3), opt=ref_opt)
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_a_rule_on_sltrain_factors_while_s_gets_adamw():
    comp = compose(
        ["sltrain", "galore"],
        {"sltrain": {"rank": 4, "targets": ["feed_forward.*"]},
         "galore": {"rank": 2, "roles": ["B", "A"], "targets": ["feed_forward.*"]}},
    )
    m = block()
    comp.apply_parametrizations(m)
    comp.init_parametrized(m)
    opt = train(comp, m, batches(2))
    roles = {}
    for spec, p in comp.param_specs(m):
        if p.requires_grad:
            roles.setdefault(spec.role, set()).add(next(g["rule"] for g in opt.param_groups if any(p is q for q in g["params"])))
    assert roles["B"] == roles["A"] == {"galore"} and roles["S"] == {"adamw"}


def test_overlap_on_the_real_model_names_both_methods_and_the_parameter():
    # patterns that the probe cannot see overlap ("*w1" and "feed_forward.*") meet on the model
    comp = compose(
        ["galore", "fira"],
        {"galore": {"rank": 2, "targets": ["*w1"]}, "fira": {"rank": 2, "targets": ["feed_forward.w2"]}},
    )
    comp.method("fira").config.__dict__  # noqa: B018 (configs are frozen; swap the method below)
    object.__setattr__(comp.method("fira").config, "targets", ("feed_forward.*",))
    with pytest.raises(CompositionError) as err:
        comp.param_groups(block())
    msg = str(err.value)
    assert "'galore'" in msg and "'fira'" in msg and "feed_forward.w1.weight" in msg


def test_memory_estimate_counts_each_parameter_under_its_own_rule():
    specs = llama_dense_specs(64, 160, 2, 100, 4)
    r = 8
    comp = compose(["galore", "fira"], {"galore": {"rank": r, "targets": ["*.attention.*"]},
                                        "fira": {"rank": r, "targets": ["*.feed_forward.*"]}})
    est = comp.estimate_memory(specs)
    expected = 0
    for s in specs:
        if ".attention." in s.module or ".feed_forward." in s.module:
            m, n = s.shape
            expected += 2 * r * max(m, n) + r * min(m, n)
        else:
            expected += 2 * s.numel
    assert est.optimizer_state_elements == expected
    # before the rules, only the first optimizer method counted: fira's MLP weights got AdamW's 2 numel
    galore_only = compose(["galore"], {"galore": {"rank": r, "targets": ["*.attention.*"]}}).estimate_memory(specs)
    assert est.optimizer_state_elements < galore_only.optimizer_state_elements


# -- declared state --------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["galore", "fira", "adamw"])
def test_bf16_state_keeps_its_declared_dtype_and_resume_is_bitwise(recipe):
    sections = {recipe: {"rank": 4, "update_proj_gap": 2}} if recipe != "adamw" else {}
    comp = compose([recipe], sections)
    xs = batches(6, dtype=torch.bfloat16)
    straight = block(torch.bfloat16)
    train(comp, straight, xs)

    half = block(torch.bfloat16)
    opt = train(comp, half, xs[:3])
    saved_model = {k: v.clone() for k, v in half.state_dict().items()}
    saved = opt.state_dict()
    resumed = block(torch.bfloat16, seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = comp.build_optimizer(comp.param_groups(resumed), OptimizerHyper(lr=0.01, weight_decay=0.1))
    opt2.load_state_dict(saved)
    for p in resumed.parameters():
        for decl in opt2.declared[p]:
            assert opt2.state[p][decl.name].dtype == (decl.dtype or p.dtype), decl.name
    if recipe != "adamw":
        assert opt2.state[resumed.attention.wq.weight]["proj"].dtype == torch.float32
    assert opt2.global_step == 3
    train(comp, resumed, xs[3:], opt=opt2)
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), f"{recipe} {name} after resume"


class _Rule(UpdateRule):
    def __init__(self, extra=None, shape_of_m=None):
        self.extra, self.shape_of_m = extra, shape_of_m

    def state_specs(self, spec):
        return [StateSpec("m", spec.shape, layout="rows", moment=True), StateSpec("seed", (), torch.float32, OnReset.KEEP, init_value=7.0)]

    def step(self, params, info):
        for p in params:
            p.state["m"].add_(p.grad)
            p.param.data.add_(p.state["m"], alpha=-info.lr)
            if self.extra:
                p.state[self.extra] = torch.zeros(1)
            if self.shape_of_m:
                p.state["m"] = torch.zeros(self.shape_of_m)


def _optimizer(rule, p):
    rule.method = "myrule"
    spec = ParamSpec("layer.weight", "layer", "weight", tuple(p.shape), is_linear=True)
    return ComposedOptimizer([{"params": [p], "rule": "myrule"}], rules={"myrule": rule}, specs={p: spec}, lr=0.1)


def test_undeclared_state_is_refused_naming_the_method_and_the_key():
    p = nn.Parameter(torch.randn(3, 4))
    opt = _optimizer(_Rule(extra="velocity"), p)
    p.grad = torch.ones_like(p)
    with pytest.raises(CompositionError, match=r"\[myrule\] the update rule created undeclared state 'velocity'"):
        opt.step()


def test_declared_state_the_rule_does_not_keep_is_refused():
    p = nn.Parameter(torch.randn(3, 4))
    opt = _optimizer(_Rule(shape_of_m=(2,)), p)
    p.grad = torch.ones_like(p)
    with pytest.raises(CompositionError, match=r"\[myrule\] state 'm' of layer.weight: declared shape \(3, 4\)"):
        opt.step()


def test_state_is_created_from_the_declarations_and_reset_by_them():
    p = nn.Parameter(torch.randn(3, 4))
    opt = _optimizer(_Rule(), p)
    assert opt.state[p]["seed"].item() == 7.0 and opt.state[p]["m"].shape == (3, 4)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["m"].abs().sum() > 0
    assert opt.reset_state([p]) == 1
    assert opt.state[p]["m"].abs().sum() == 0 and opt.state[p]["seed"].item() == 7.0


def test_an_unknown_reset_policy_names_the_state_the_value_and_the_policies():
    with pytest.raises(ValueError, match="state 'm': on_reset = 'forget' is not a reset policy; allowed: zero, keep, init"):
        StateSpec("m", (2,), on_reset="forget")
    with pytest.raises(ValueError, match="layout = 'cols'; allowed: rows, replicate"):
        StateSpec("m", (2,), layout="cols")


@dataclasses.dataclass(frozen=True)
class _AnyConfig:
    targets: tuple[str, ...] = ("*",)
    roles: tuple[str, ...] = ("*",)


class _MatrixEverywhere(Method):
    """An optimizer method whose selection reaches 1-D parameters, with a matrix rule."""

    name = "matrix_everywhere"
    Config = _AnyConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def selects(self, spec):
        return spec.trainable and spec.module.endswith("norm")

    def update_rule(self):
        return _Rule()


def test_a_matrix_rule_on_a_vector_is_refused_before_training():
    comp = compose(["matrix_everywhere"], {}, available={"matrix_everywhere": _MatrixEverywhere, "adamw": _adamw()})
    with pytest.raises(ConfigError, match=r"\[matrix_everywhere\] selects norm.weight with shape \(16,\), but its update rule needs a matrix"):
        comp.param_groups(block())


def _adamw():
    from slimtrain.plugins.adamw import AdamW

    return AdamW


# -- the true step ---------------------------------------------------------------------------------------
def test_rules_see_the_true_step_and_it_survives_a_state_dict_round_trip():
    seen = []

    class Recording(_Rule):
        def step(self, params, info):
            seen.append(info.step)
            super().step(params, info)

    p = nn.Parameter(torch.randn(3, 4))
    opt = _optimizer(Recording(), p)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    q = nn.Parameter(torch.randn(3, 4))
    opt2 = _optimizer(Recording(), q)
    opt2.load_state_dict(opt.state_dict())
    q.grad = torch.ones_like(q)
    opt2.step()
    assert seen == [1, 2, 3, 4]


def test_step_params_steps_only_those_and_finish_step_counts():
    comp = compose(*TWO)
    m = block()
    opt = comp.build_optimizer(comp.param_groups(m), OptimizerHyper(lr=0.01))
    m(batches(1)[0]).pow(2).mean().backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step_params([m.feed_forward.w1.weight])
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"feed_forward.w1.weight"} and opt.global_step == 0
    opt.finish_step()
    assert opt.global_step == 1
