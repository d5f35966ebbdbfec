"""APOLLO, APOLLO-Mini, Muon and SCALE against their references on the same gradients.

* APOLLO / APOLLO-Mini: apollo-torch 1.0.3 (its optimizer module, loaded without the package's
  transformers/bitsandbytes imports), the projection fixed by feeding our rule the package's seed
  chain, >= 20 steps with two projection refreshes, weight decay and the limiter engaged.
* Muon: torch.optim.Muon.
* SCALE: an independent statement of Algorithm 1 with the released code's conventions, below.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from slimtrain.registry import ConfigError, OptimizerHyper, compose

STEPS = 24


class Net(nn.Module):
    """Both projection sides: wq 16 x 16 and w1 40 x 16 (right, m >= n), w2 16 x 40 (left, m < n)."""

    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(16, 16, bias=False)
        self.w1 = nn.Linear(16, 40, bias=False)
        self.w2 = nn.Linear(40, 16, bias=False)


def net():
    torch.manual_seed(0)
    return Net()


def gradients(model, steps=STEPS, growth=1.15):
    """A fixed gradient sequence per parameter whose norm grows (so the limiter engages)."""
    gen = torch.Generator().manual_seed(1)
    return [
        {n: torch.randn(p.shape, generator=gen) * growth**t for n, p in model.named_parameters()} for t in range(steps)
    ]


def ours(methods, sections, model, hyper):
    comp = compose(methods, sections)
    return comp.build_optimizer(comp.param_groups(model), hyper)


def run(model, opt, grads):
    for g in grads:
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()


def max_rel(a: nn.Module, b: nn.Module) -> float:
    return max(((pa - pb).norm() / pb.norm()).item() for pa, pb in zip(a.parameters(), b.parameters()))


# -- APOLLO --------------------------------------------------------------------------------------
def load_apollo_torch():
    """apollo_torch.apollo and .random_projector without running the package's __init__ (which
    imports transformers and bitsandbytes); only ``require_version`` is needed from transformers."""
    spec = importlib.util.find_spec("apollo_torch")
    if spec is None:
        pytest.fail("apollo-torch is not installed: run scripts/setup.sh (it installs the reference optimizers)")
    path = spec.submodule_search_locations[0]
    saved = {k: sys.modules.get(k) for k in ("apollo_torch", "transformers", "transformers.utils", "transformers.utils.versions")}
    try:
        pkg = types.ModuleType("apollo_torch")
        pkg.__path__ = [path]
        sys.modules["apollo_torch"] = pkg
        if importlib.util.find_spec("transformers") is None:
            versions = types.ModuleType("transformers.utils.versions")
            versions.require_version = lambda *a, **k: None
            sys.modules["transformers"] = types.ModuleType("transformers")
            sys.modules["transformers.utils"] = types.ModuleType("transformers.utils")
            sys.modules["transformers.utils.versions"] = versions
        mods = {}
        for name in ("random_projector", "svd_projector", "apollo"):
            s = importlib.util.spec_from_file_location(f"apollo_torch.{name}", f"{path}/{name}.py")
            mod = importlib.util.module_from_spec(s)
            sys.modules[f"apollo_torch.{name}"] = mod
            s.loader.exec_module(mod)
            mods[name] = mod
        return mods["apollo"].AdamW, mods["random_projector"].next_seed
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for name in ("random_projector", "svd_projector", "apollo"):
            sys.modules.pop(f"apollo_torch.{name}", None)


APOLLO_CASES = {
    "apollo": dict(rank=4, update_proj_gap=10, scale=2.0, scale_type="channel"),
    "apollo_mini": dict(rank=1, update_proj_gap=10, scale=128.0, scale_type="tensor"),
}


@pytest.mark.parametrize("method", list(APOLLO_CASES))
def test_apollo_equals_apollo_torch_with_the_projection_fixed(method, monkeypatch):
    from slimtrain.plugins.apollo import ApolloRule

    reference_cls, next_seed = load_apollo_torch()
    case = APOLLO_CASES[method]
    hyper = OptimizerHyper(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)

    ref_model, our_model = net(), net()
    names = [n for n, _ in ref_model.named_parameters()]
    # the package seeds each parameter with its 1-based position, then advances with next_seed
    chain = {f"{n}": i + 1 for i, n in enumerate(names)}
    limiters = []

    def package_seed(self, p, step_before):
        seed = chain[p.name]
        chain[p.name] = next_seed(seed)
        return seed

    monkeypatch.setattr(ApolloRule, "projection_seed", package_seed)
    ref = reference_cls(
        [{
            "params": list(ref_model.parameters()), "rank": case["rank"], "update_proj_gap": case["update_proj_gap"],
            "scale": case["scale"], "proj": "random", "proj_type": "std", "scale_type": case["scale_type"],
        }],
        lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=hyper.weight_decay,
    )
    opt = ours([method], {method: {k: v for k, v in case.items() if k != "scale_type"}}, our_model, hyper)
    grads = gradients(ref_model)
    for t, g in enumerate(grads):
        for model in (ref_model, our_model):
            for n, p in model.named_parameters():
                p.grad = g[n].clone()
        ref.step()
        opt.step()
        prev = opt.state[our_model.w1.weight]["limiter_prev"].item()
        limiters.append(prev)
        assert max_rel(our_model, ref_model) < 1e-6, (method, t, max_rel(our_model, ref_model))
    # the limiter engaged: the recorded norm grew by exactly gamma on the limited steps
    ratios = [b / a for a, b in zip(limiters, limiters[1:])]
    assert sum(abs(r - 1.01) < 1e-6 for r in ratios) >= 10, ratios
    # and two refreshes happened (steps 11 and 21 used fresh seeds)
    assert chain["w1.weight"] != 2 and opt.state[our_model.w1.weight]["step"].item() == STEPS


def test_apollo_state_and_reset_declarations():
    comp = compose(["apollo", "momentum_reset"], {"apollo": {"rank": 4}, "momentum_reset": {"every": 3}})
    rule = comp.method("apollo").update_rule()
    from slimtrain.registry import ParamSpec
    from slimtrain.registry.update_rule import OnReset

    specs = {s.name: s for s in rule.state_specs(ParamSpec("w2.weight", "w2", "weight", (16, 40), is_linear=True))}
    assert specs["exp_avg"].shape == (4, 40) and specs["exp_avg"].on_reset is OnReset.ZERO
    assert specs["proj"].shape == (16, 4) and specs["proj"].on_reset is OnReset.KEEP
    assert specs["limiter_prev"].on_reset is OnReset.INIT and specs["limiter_prev"].init_value == -1.0
    right = {s.name: s for s in rule.state_specs(ParamSpec("w1.weight", "w1", "weight", (40, 16), is_linear=True))}
    assert right["exp_avg"].shape == (40, 4) and right["exp_avg"].layout == "rows"


# -- Muon ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_torch_optim_muon(adjust, nesterov):
    hyper = OptimizerHyper(lr=0.02, weight_decay=0.1)
    ref_model, our_model = net(), net()
    ref = torch.optim.Muon(
        ref_model.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay, momentum=0.9, nesterov=nesterov,
        adjust_lr_fn=adjust,
    )
    opt = ours(["muon"], {"muon": {"momentum": 0.9, "nesterov": nesterov, "adjust_lr": adjust}}, our_model, hyper)
    grads = gradients(ref_model)
    run(ref_model, ref, grads)
    run(our_model, opt, grads)
    for (n, a), b in zip(our_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, b) for a, b in zip(our_model.parameters(), net().parameters()))


def test_muon_lr_ratio_scales_the_matrix_step_only():
    hyper = OptimizerHyper(lr=0.01)
    ref_model, our_model = net(), net()
    ref = torch.optim.Muon(ref_model.parameters(), lr=0.03, weight_decay=0.0, momentum=0.95, adjust_lr_fn="original")
    opt = ours(["muon"], {"muon": {"lr_ratio": 3.0, "adjust_lr": "original"}}, our_model, hyper)
    grads = gradients(ref_model, steps=3)
    run(ref_model, ref, grads)
    run(our_model, opt, grads)
    assert max_rel(our_model, ref_model) < 1e-6


# -- SCALE ---------------------------------------------------------------------------------------
class LM(nn.Module):
    """An embedding, two hidden Linear weights, a norm and an output head (the SCALE parameter kinds)."""

    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(50, 16)
        self.wq = nn.Linear(16, 16, bias=False)
        self.w1 = nn.Linear(16, 40, bias=False)
        self.norm = nn.LayerNorm(16, bias=False)
        self.output = nn.Linear(16, 50, bias=False)


def scale_algorithm_1(params: dict, grads: list[dict], lr: float, wd: float, mu: float) -> dict:
    """Algorithm 1 of the SCALE paper with the released code's conventions, written independently:
    for each matrix W (x W layout, i.e. torch's W^T) with gradient G, the column-normalized step
    W <- W - lr * G_{:,j} / rms(G_{:,j}); the last layer uses the momentum M = mu M + (1 - mu) G in place
    of G. In torch's (out, in) layout the math's columns are the rows of a Linear weight; an embedding
    (vocab, dim) is already in x W layout (columns = dims). Code conventions: RMS = sqrt(mean), floor
    1e-8, decoupled weight decay W (1 - lr wd) before the step."""
    params = {k: v.clone().double() for k, v in params.items()}
    momentum = torch.zeros_like(params["output.weight"])
    for g in grads:
        for name, w in params.items():
            grad = g[name].double()
            if name == "output.weight":
                momentum = mu * momentum + (1 - mu) * grad
                grad = momentum
            math_layout = grad if name == "tok_embeddings.weight" else grad.T  # rows = inputs
            col_rms = torch.sqrt((math_layout**2).sum(dim=0) / math_layout.shape[0]).clamp(min=1e-8)
            step = math_layout / col_rms
            step = step if name == "tok_embeddings.weight" else step.T
            params[name] = w * (1 - lr * wd) - lr * step
    return params


def test_scale_equals_algorithm_1_with_the_code_conventions():
    torch.manual_seed(0)
    model = LM()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    hyper = OptimizerHyper(lr=0.01, weight_decay=0.1)
    opt = ours(["scale"], {"scale": {"momentum": 0.9, "targets": ["wq", "w1", "output"]}}, model, hyper)
    assert {g["rule"]: len(g["params"]) for g in opt.param_groups} == {"scale": 4, "adamw": 1}
    grads = gradients(model, steps=6)
    run(model, opt, grads)
    expected = scale_algorithm_1({k: v for k, v in start.items() if k != "norm.weight"}, grads, 0.01, 0.1, 0.9)
    for name, want in expected.items():
        got = dict(model.named_parameters())[name].double()
        assert ((got - want).norm() / want.norm()).item() < 1e-6, name
    assert set(opt.state[model.output.weight]) == {"moment1"} and not opt.state[model.wq.weight]


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, key, value, allowed",
    [
        ("apollo", "rank", 0, "[1, inf)"),
        ("apollo", "update_proj_gap", 0, "[1, inf)"),
        ("apollo", "scale", 0.0, "(0, inf)"),
        ("apollo", "scale_type", "row", "'channel', 'tensor'"),
        ("apollo_mini", "gamma", 0.5, "[1.0, inf)"),
        ("muon", "ns_steps", 0, "[1, 99]"),
        ("muon", "momentum", 1.0, "[0.0, 1.0)"),
        ("muon", "momentum", -0.1, "[0.0, 1.0)"),
        ("muon", "adjust_lr", "rms", "'original'"),
        ("muon", "ns_dtype", "fp8", "'bfloat16', 'float32'"),
        ("scale", "momentum", 1.5, "[0.0, 1.0)"),
        ("scale", "lr_ratio", 0.0, "(0, inf)"),
    ],
)
def test_bad_settings_name_key_value_and_range(method, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        compose([method], {method: {key: value}})
    msg = str(err.value)
    assert f"[{method}] {key} = {value!r}" in msg and allowed in msg, msg


def test_rank_above_the_matrix_dimension_and_non_matrix_params_are_refused():
    comp = compose(["apollo"], {"apollo": {"rank": 17, "targets": ["wq"]}})  # wq is 16 x 16
    with pytest.raises(ConfigError, match=r"\[apollo\] rank = 17 is out of range for wq.weight with shape 16 x 16; allowed: \[1, 16\]"):
        comp.param_groups(net())

    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(16, 16)

    for method in ("apollo", "muon", "scale"):
        comp = compose([method], {method: {"targets": ["wq"], "roles": ["weight", "bias"], **({"rank": 4} if method == "apollo" else {})}})
        with pytest.raises(ConfigError, match=rf"\[{method}\] selects wq.bias with shape \(16,\).*needs a matrix"):
            comp.param_groups(Biased())


@pytest.mark.parametrize(
    "method, zeroed, kept",
    [
        ("apollo", ["exp_avg", "exp_avg_sq", "step"], ["proj"]),
        ("apollo_mini", ["exp_avg", "exp_avg_sq", "step"], ["proj"]),
        ("muon", ["momentum_buffer"], []),
        ("scale", ["moment1"], []),
    ],
)
def test_momentum_reset_applies_each_rules_declarations(method, zeroed, kept):
    from slimtrain.registry import StepContext

    class WithHead(Net):
        def __init__(self):
            super().__init__()
            self.output = nn.Linear(16, 8, bias=False)

    torch.manual_seed(0)
    model = WithHead()
    sections = {method: {"rank": 4} if method == "apollo" else {}, "momentum_reset": {"every": 2, "warmup_steps": 0}}
    comp = compose([method, "momentum_reset"], sections)
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=0.01))
    target = model.output.weight if method == "scale" else model.w2.weight
    for step, g in enumerate(gradients(model, steps=2), start=1):
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
        before = {k: v.clone() for k, v in opt.state[target].items()}
        comp.after_step(StepContext(step, [model], [opt]))
    state = opt.state[target]
    for key in zeroed:
        assert torch.count_nonzero(before[key]) > 0 and torch.count_nonzero(state[key]) == 0, key
    for key in kept:
        assert torch.equal(state[key], before[key]) and torch.count_nonzero(state[key]) > 0, key
    if method.startswith("apollo"):
        assert before["limiter_prev"].item() > 0 and state["limiter_prev"].item() == -1.0
