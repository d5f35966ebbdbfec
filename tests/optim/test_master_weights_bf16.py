"""master_weights_bf16: parameters as bf16 + an int8 correction; the restored fp32 weight follows an
fp32-master run on the same gradients (measured tolerance below), far closer than bf16 weights
without the correction; composes with the rules, 8-bit state and per-layer updates; the correction
survives a state-dict round trip bitwise; bad input refused naming method, key and value.

Measured (2026-12-06, 2-core CPU; max over the parameters of the relative L2 gap, lr 3e-3, wd 0.1):
after STEPS = 100 steps on the same bf16-representable gradients the restored weights are within
6.6e-5 .. 7.6e-5 of the fp32-master run over the rules below (after 200 steps: 9.1e-5 .. 1.03e-4,
a random walk of the per-step rounding of at most 2^-16 relative), against 3.0e-2 .. 3.7e-2 for bf16
weights without the correction (rounded to nearest after every step): 0.21% .. 0.24% of it. The
test bounds the gap by GAP_TOL and by RATIO times the bf16-only gap.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtrain.plugins.master_weights_bf16 import KEY, restore, split
from slimtrain.registry import CompositionError, ConfigError, OptimizerHyper, compose

HYPER = OptimizerHyper(lr=3e-3, weight_decay=0.1)
STEPS = 100
GAP_TOL = 1.5e-4  # relative L2 gap, restored weight vs fp32 master, after STEPS steps (measured <= 7.6e-5)
RATIO = 0.01  # ... and at most this share of the bf16-weights-only gap (measured <= 0.0024)

RULES = {
    "adamw": (["adamw"], {}),
    "galore": (["galore"], {"galore": {"rank": 4, "update_proj_gap": 50, "targets": ["attention.*"]}}),
    "apollo": (["apollo"], {"apollo": {"rank": 4, "update_proj_gap": 50, "targets": ["feed_forward.*"]}}),
    "muon": (["muon"], {"muon": {"ns_dtype": "float32", "targets": ["feed_forward.*"]}}),
    "sinkgd": (["sinkgd"], {"sinkgd": {"targets": ["attention.*"]}}),
    "stable_spam": (["stable_spam"], {}),
    "adam_mini": (["adam_mini"], {"adam_mini": {"head_dim": 8}}),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.wq = nn.Linear(24, 32, bias=False)
        self.attention.wo = nn.Linear(32, 24, bias=False)
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(24, 48, bias=False)
        self.feed_forward.w2 = nn.Linear(48, 24, bias=False)
        self.norm = nn.RMSNorm(24)

    def forward(self, x):
        h = self.norm(x)
        h = h + self.attention.wo(self.attention.wq(h))
        return h + self.feed_forward.w2(torch.relu(self.feed_forward.w1(h)))


def net(seed=0) -> Net:
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():  # bf16-representable start: both runs begin at the same weights
            p.copy_(p.bfloat16().float())
    return model


def build(methods, sections, model, *, master: bool):
    comp = compose([*methods, *(["master_weights_bf16"] if master else [])], sections)
    comp.describe_model(None)
    groups = comp.param_groups(model)
    comp.store_parameters(model)
    opt = comp.build_optimizer(groups, HYPER)
    comp.install_memory_layers(opt)
    return comp, opt


def grads(model, steps, seed=3):
    """Per step, per parameter name: a bf16-representable gradient (both runs get the same one)."""
    g = torch.Generator().manual_seed(seed)
    return [{n: (torch.randn(p.shape, generator=g) * 0.1).bfloat16() for n, p in model.named_parameters()}
            for _ in range(steps)]


def weights(model, opt):
    """The fp32 weights: the parameter, or (with master weights) bf16 + correction restored."""
    out = {}
    for n, p in model.named_parameters():
        if opt.master is not None:
            out[n] = restore(p.detach(), opt.state[p][KEY])
        else:
            out[n] = p.detach().clone().float()
    return out


def gap(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


def train(methods, sections, gs, *, master: bool, round_bf16: bool = False):
    model = net()
    _, opt = build(methods, sections, model, master=master)
    for step in gs:
        for n, p in model.named_parameters():
            p.grad = step[n].to(p.dtype)
        opt.step()
        opt.zero_grad()
        if round_bf16:  # bf16 weights, no correction: round to nearest after every step
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.bfloat16().float())
    return model, opt


def test_split_restores_within_a_254th_of_half_a_bf16_ulp():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10000, generator=g) * torch.logspace(-6, 2, 10000)
    stored, q = split(w)
    assert stored.dtype == torch.bfloat16 and q.dtype == torch.int8
    assert torch.equal(stored, w.bfloat16())  # the weight forward uses is the nearest bf16
    half = torch.ldexp(torch.ones_like(w), torch.frexp(stored.float())[1] - 9)
    err = (restore(stored, q) - w).abs()
    assert (err <= half / 254 * 1.0001 + 1e-30).all(), (err / half).max()
    assert (err / w.abs()).max() < 2**-15  # relative: ~16 mantissa bits (bf16 alone: 2^-9)
    assert ((stored.float() - w).abs() / w.abs()).max() > 2**-12  # ... which the correction carries


@pytest.mark.parametrize("rule", sorted(RULES))
def test_restored_weight_follows_the_fp32_master_run_on_the_same_grads(rule):
    methods, sections = RULES[rule]
    gs = grads(net(), STEPS)
    ref, _ = train(methods, sections, gs, master=False)
    model, opt = train(methods, sections, gs, master=True)
    plain, _ = train(methods, sections, gs, master=False, round_bf16=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    want = weights(ref, opt=type("O", (), {"master": None})())
    got = gap(weights(model, opt), want)
    bf16_only = gap({n: p.detach() for n, p in plain.named_parameters()}, want)
    assert bf16_only > 1e-4, bf16_only  # the test can fail: bf16 weights alone drift measurably
    assert got < GAP_TOL and got < RATIO * bf16_only, (rule, got, bf16_only)
    # state declared without a dtype is kept in fp32, like the fp32-master run's
    for p in model.parameters():
        for decl in opt.declared[p]:
            if decl.dtype is None and decl.shape:
                assert opt.state[p][decl.name].dtype == torch.float32


def test_composes_with_8bit_state_like_8bit_state_on_fp32_masters():
    sections = {"state_8bit": {"block_size": 16}}
    gs = grads(net(), 30)
    ref, _ = train(["adamw", "state_8bit"], sections, gs, master=False)
    model, opt = train(["adamw", "state_8bit"], sections, gs, master=True)
    assert any(k.endswith("_q8") for k in opt.state[model.attention.wq.weight])
    assert gap(weights(model, opt), weights(ref, type("O", (), {"master": None})())) < 1e-3


def test_per_layer_updates_with_master_weights_equal_the_plain_step():
    """The stepper steps each bf16 parameter in backward through the layer: the same result as the
    plain step after backward (same bf16 forward, so the same gradients)."""
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(5)).bfloat16()
    out = []
    for per_layer in (False, True):
        model = net()
        _, opt = build(["adamw", *(["per_layer_updates"] if per_layer else [])], {}, model, master=True)
        for _ in range(3):
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        out.append(model)
    for (n, a), b in zip(out[0].named_parameters(), out[1].parameters()):
        assert torch.equal(a, b), n
        assert a.dtype == torch.bfloat16


def test_state_dict_round_trip_is_bitwise():
    gs = grads(net(), 6)
    model, opt = train(["adamw"], {}, gs[:3], master=True)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for step in gs[3:]:
        for n, p in model.named_parameters():
            p.grad = step[n].bfloat16()
        opt.step()
        opt.zero_grad()
    fresh = net()
    _, opt2 = build(["adamw"], {}, fresh, master=True)
    fresh.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.state[fresh.attention.wq.weight][KEY].dtype == torch.int8
    assert opt2.state[fresh.attention.wq.weight]["exp_avg"].dtype == torch.float32
    for step in gs[3:]:
        for n, p in fresh.named_parameters():
            p.grad = step[n].bfloat16()
        opt2.step()
        opt2.zero_grad()
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(opt.state[a][KEY], opt2.state[b][KEY]), n


def test_memory_model_counts_one_byte_per_trainable_element():
    from slimtrain.registry import llama_dense_specs

    dense = llama_dense_specs(64, 128, 2, 100, 4)
    trainable = sum(s.numel for s in dense)
    for methods in (["adamw"], ["galore", "state_8bit"], ["sinkgd"]):
        base = compose(methods).estimate_memory(dense)
        with_master = compose([*methods, "master_weights_bf16"]).estimate_memory(dense)
        assert with_master.weights_bytes == base.weights_bytes  # bf16 weights, as the paper counts them
        assert with_master.optimizer_bytes - base.optimizer_bytes == trainable, methods


def test_non_floating_parameter_is_refused_naming_method_parameter_and_dtype():
    import slimtrain

    model = net()
    model.counts = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError) as e:
        slimtrain.prepare(model, ["adamw", "master_weights_bf16"])
    msg = str(e.value)
    assert "master_weights_bf16" in msg and "counts" in msg and "torch.int64" in msg
    assert all(p.dtype == before[n].dtype for n, p in model.named_parameters())  # nothing changed


def test_a_method_writing_weights_outside_the_step_is_refused():
    with pytest.raises(ConfigError) as e:
        compose(["lora", "lora_merge", "master_weights_bf16"], {"lora": {"rank": 4}, "lora_merge": {"every": 10}})
    msg = str(e.value)
    assert "[master_weights_bf16]" in msg and "methods" in msg and "lora_merge" in msg
    with pytest.raises(ConfigError, match="refactorization"):
        compose(["low_rank", "refactorization", "master_weights_bf16"], {"low_rank": {"rank": 4}, "refactorization": {"every": 10}})
    compose(["lora", "master_weights_bf16"], {"lora": {"rank": 4}})  # no weight-writing hook: fine


def test_parameters_not_in_the_storage_dtype_are_refused_at_install():
    comp = compose(["adamw", "master_weights_bf16"])
    model = net()
    opt = comp.build_optimizer(comp.param_groups(model), HYPER)  # store_parameters skipped
    with pytest.raises(CompositionError, match="store_parameters"):
        comp.install_memory_layers(opt)


def test_chunked_restore_and_split_equal_the_whole_tensor(monkeypatch):
    from slimtrain.plugins import master_weights_bf16 as mw

    w = torch.randn(5, 13, generator=torch.Generator().manual_seed(2))
    stored, q = split(w)
    layer = mw.Bf16Correction()
    monkeypatch.setattr(mw, "CHUNK", 7)
    assert torch.equal(layer.restore(stored, {KEY: q}), restore(stored, q))
    p, state = torch.empty_like(stored), {KEY: torch.empty_like(q)}
    layer.store(p, w, state)
    assert torch.equal(p, stored) and torch.equal(state[KEY], q)
