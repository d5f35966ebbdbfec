"""state_8bit: declared moments stored quantized, everything else full precision; the step equals an
independent statement of "AdamW on dequantized moments, moments re-quantized after"; resume bitwise;
composes with galore/fira; bad input refused naming method, key and value."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimtrain.plugins.state_8bit import Quant8Codec, State8bitConfig, install_codec
from slimtrain.registry import ConfigError, OptimizerHyper, compose
from slimtrain.registry.quant8 import dequantize, max_gap, quantize

HYPER = OptimizerHyper(lr=0.01, weight_decay=0.1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.wq = nn.Linear(300, 24, bias=False)  # 300 columns: a short tail block
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(24, 40, bias=False)
        self.norm = nn.LayerNorm(300)

    def forward(self, x):
        return self.feed_forward.w1(self.attention.wq(self.norm(x)))


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 300, generator=g) for _ in range(n)]


def build(comp, model, codec=None):
    opt = comp.build_optimizer(comp.param_groups(model), HYPER)
    if codec is not None:
        install_codec(opt, codec)
    return opt


def run(opt, model, xs, comp=None):
    from slimtrain.registry import StepContext

    for x in xs:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if comp is not None:  # step hooks (momentum reset)
            comp.after_step(StepContext(step=opt.global_step, model_parts=[model], optimizers=[opt]))


def _moments(opt, p):
    decls = {d.name: d for d in opt.declared[p]}
    return (opt.codec.decode(decls["exp_avg"], opt.state[p], torch.float32).clone(),
            opt.codec.decode(decls["exp_avg_sq"], opt.state[p], torch.float32).clone())


def test_adamw_step_equals_adam_on_dequantized_moments_requantized_after():
    comp = compose(["adamw"], {})
    model = net()
    opt = build(comp, model, Quant8Codec(block_size=64))
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, HYPER.lr, HYPER.weight_decay
    for t, x in enumerate(data(4), start=1):
        model(x).pow(2).mean().backward()
        before = {n: (p.detach().clone(), p.grad.clone(), *_moments(opt, p)) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        for n, p in model.named_parameters():  # the independent statement, from the stored moments
            w, g, m, v = before[n]
            mm = b1 * m + (1 - b1) * g
            vv = b2 * v + (1 - b2) * g**2
            want = w * (1 - lr * wd) - lr * (mm / (1 - b1**t)) / ((vv / (1 - b2**t)).sqrt() + eps)
            torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
            got_m, got_v = _moments(opt, p)
            if mm.dim() >= 2:  # matrices are stored in 8 bits (v as sqrt(v)), 1-D moments in full
                mm = dequantize(*quantize(mm, signed=True, block_size=64), signed=True, block_size=64)
                vv = dequantize(*quantize(vv.sqrt(), signed=False, block_size=64), signed=False, block_size=64) ** 2
            for got, ref in ((got_m, mm), (got_v, vv)):
                off = (got - ref).abs() > 1e-7 + 1e-5 * ref.abs()  # a value on a midpoint may round one code away
                assert off.float().mean() < 1e-3, n
                assert torch.all((got - ref).abs() <= 2 * ref.abs().max() * max_gap("dynamic", True) + 1e-12), n


def test_moments_are_uint8_projections_and_counters_full_precision():
    comp = compose(["galore"], {"galore": {"rank": 4, "update_proj_gap": 2, "targets": ["attention.*"]}})
    model = net()
    opt = build(comp, model, Quant8Codec())
    run(opt, model, data(3))
    s = opt.state[model.attention.wq.weight]
    assert s["exp_avg_q8"].dtype == torch.uint8 and s["exp_avg_sq_q8"].dtype == torch.uint8
    assert s["exp_avg_absmax"].dtype == torch.float32
    assert "exp_avg" not in s and s["proj"].dtype == torch.float32
    norm = opt.state[model.norm.weight]  # 1-D: full precision
    assert norm["exp_avg"].dtype == torch.float32 and "exp_avg_q8" not in norm


@pytest.mark.parametrize("methods,cfg", [
    (["adamw"], {}),
    (["galore"], {"galore": {"rank": 4, "update_proj_gap": 2, "targets": ["attention.*"]}}),
    (["fira"], {"fira": {"rank": 4, "update_proj_gap": 2, "targets": ["attention.*", "feed_forward.*"]}}),
    (["galore", "momentum_reset"], {"galore": {"rank": 4, "update_proj_gap": 2, "targets": ["attention.*"]},
                                    "momentum_reset": {"every": 2, "warmup_steps": 1}}),
])
def test_resume_is_bitwise_and_training_tracks_full_precision(methods, cfg):
    comp = compose(methods, cfg)
    xs = data(6)
    model = net()
    opt = build(comp, model, Quant8Codec())
    for i, x in enumerate(xs):
        run(opt, model, [x], comp)
        if i == 2:
            saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = net(seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = build(comp, resumed, Quant8Codec())
    opt2.load_state_dict(saved_opt)
    run(opt2, resumed, xs[3:], comp)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    full = net()
    run(build(comp, full), full, xs, comp)  # same recipe, full-precision state
    for (n, a), b, b0 in zip(model.named_parameters(), full.parameters(), net().parameters()):
        # the 8-bit run differs from the full-precision one by a small part of how far training moved
        assert (a - b).norm() < 0.1 * (b - b0).norm(), n


def test_reset_zeroes_quantized_moments():
    comp = compose(["adamw"], {})
    model = net()
    opt = build(comp, model, Quant8Codec())
    run(opt, model, data(2))
    w = model.attention.wq.weight
    assert opt.state[w]["exp_avg_absmax"].abs().sum() > 0
    opt.reset_state([w])
    assert opt.state[w]["exp_avg_absmax"].abs().sum() == 0


@pytest.mark.parametrize("key,value,allowed", [("block_size", 0, "integer > 0"), ("block_size", -256, "integer > 0"),
                                               ("map", "log", "dynamic, linear")])
def test_bad_config_names_method_key_value(key, value, allowed):
    with pytest.raises(ConfigError, match=rf"\[state_8bit\] {key} = {value!r}.*{allowed}"):
        State8bitConfig(**{key: value})


def test_bad_config_through_compose():
    with pytest.raises(ConfigError, match=r"state_8bit.*block_size.*0"):
        compose(["adamw", "state_8bit"], {"state_8bit": {"block_size": 0}})


def test_the_map_follows_the_declaration_not_the_key_name():
    """A second moment called ``nu`` declared ``non_negative`` is stored as sqrt(v) with the unsigned
    map; a moment called ``exp_avg_sq`` that does not declare it gets the signed map."""
    from slimtrain.registry.update_rule import StateSpec

    codec = Quant8Codec(block_size=64)
    v = torch.rand(8, 128, generator=torch.Generator().manual_seed(0)) ** 4  # many decades
    for name, non_negative in (("nu", True), ("exp_avg_sq", False)):
        decl = StateSpec(name, (8, 128), None, moment=True, non_negative=non_negative)
        state = {}
        codec.encode(decl, v, state)
        codes, scales = quantize(v, signed=not non_negative, kind="dynamic", block_size=64, sqrt=non_negative)
        assert torch.equal(state[f"{name}_q8"], codes), name
        assert torch.equal(state[f"{name}_absmax"], scales), name
    unsigned = codec.decode(StateSpec("nu", (8, 128), None, moment=True, non_negative=True), {
        "nu_q8": quantize(v, signed=False, kind="dynamic", block_size=64, sqrt=True)[0],
        "nu_absmax": quantize(v, signed=False, kind="dynamic", block_size=64, sqrt=True)[1]}, torch.float32)
    assert (unsigned >= 0).all()


def test_moments_with_rows_shorter_than_their_scale_stay_full_precision():
    """APOLLO-Mini's m x 1 moments: codes plus one fp32 scale per row would cost 5 bytes per element."""
    from slimtrain.registry.update_rule import StateSpec

    codec = Quant8Codec(block_size=256)
    assert not codec.serves(StateSpec("exp_avg", (64, 1), None, moment=True))
    assert not codec.serves(StateSpec("exp_avg", (64, 3), None, moment=True))  # 1 + 4/3 bytes per element
    assert codec.serves(StateSpec("exp_avg", (64, 4), None, moment=True))  # 1 + 4/4 = 2: no more than bf16
    assert not codec.serves(StateSpec("proj", (64, 300), None))  # not a moment
