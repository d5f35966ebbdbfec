"""lora_merge: a merge leaves the layer's function unchanged and restarts the factors; ReLoRA composes."""

from __future__ import annotations


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimtrain.plugins.lora_merge import merge_
from slimtrain.registry import CompositionError, OptimizerHyper, StepContext, compose
from slimtrain.registry.parametrization import attach, originals, parametrization_of

from tests.methods.tiny import TINY, tiny_model


@given(st.integers(2, 12), st.integers(2, 12), st.integers(1, 12), st.floats(0.5, 64), st.integers(0, 2**31 - 1))
def test_merge_leaves_the_function_unchanged(m, n, r, alpha, seed):
    r = min(r, m, n)
    method = compose(["lora"], {"lora": {"rank": r, "alpha": alpha}}).method("lora")
    model = nn.Sequential(nn.Linear(n, m, dtype=torch.float64))
    attach(model[0], method.make_parametrization(model[0], "0"))
    g = torch.Generator().manual_seed(seed)
    o = originals(model[0])
    with torch.no_grad():
        for t in o.values():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    y = model(x).detach()
    w0 = o["W0"].detach().clone()
    ba = alpha / r * (o["B"] @ o["A"]).detach()
    assert merge_(model, seed=seed, step=10) == 1
    assert torch.allclose(model(x), y, rtol=1e-10, atol=1e-10)
    assert torch.allclose(o["W0"], w0 + ba, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(o["B"]) == 0
    assert 0 < o["A"].abs().max() <= 1 / n**0.5 + 1e-12
    assert not o["W0"].requires_grad


def test_every_n_steps_and_fresh_a_per_restart():
    comp = compose(["lora", "lora_merge"], {"lora": {"rank": 4}, "lora_merge": {"every": 3}})
    model = tiny_model(comp)
    wq = model.layers["0"].attention.wq
    with torch.no_grad():
        originals(wq)["B"].normal_()
    hook = comp.method("lora_merge")
    a0 = originals(wq)["A"].detach().clone()
    hook.after_step(StepContext(2, [model], []))
    assert torch.equal(originals(wq)["A"], a0)
    hook.after_step(StepContext(3, [model], []))
    a3 = originals(wq)["A"].detach().clone()
    assert not torch.equal(a3, a0) and torch.count_nonzero(originals(wq)["B"]) == 0
    with torch.no_grad():
        originals(wq)["B"].normal_()
    hook.after_step(StepContext(6, [model], []))
    assert not torch.equal(originals(wq)["A"], a3)


def test_requires_a_frozen_base():
    with pytest.raises(CompositionError, match="lora_merge.*requires.*frozen base.*lora"):
        compose(["low_rank", "lora_merge"])


def test_relora_is_a_composition_that_trains():
    comp = compose(
        ["lora", "lora_merge", "momentum_reset"],
        {"lora": {"rank": 4}, "lora_merge": {"every": 2}, "momentum_reset": {"every": 2}},
    )
    hooks = [m.name for m in comp.step_hooks()]
    assert hooks.index("lora_merge") < hooks.index("momentum_reset")  # weights first, then state
    model = tiny_model(comp)
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=3e-3))
    base_lrs = [g["lr"] for g in opt.param_groups]
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    w0 = originals(model.layers["0"].attention.wq)["W0"].detach().clone()
    losses = []
    for step in range(1, 7):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * comp.lr_factor(step)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        y_before = model(x).detach()
        comp.after_step(StepContext(step, [model], [opt]))
        assert torch.allclose(model(x), y_before, atol=1e-5)  # restarts never change the function
        losses.append(loss.item())
    assert not torch.equal(originals(model.layers["0"].attention.wq)["W0"], w0)  # merged into W0
    assert losses[-1] < losses[0]
    for fqn, mod in model.named_modules():
        if parametrization_of(mod) is not None:
            assert torch.count_nonzero(originals(mod)["B"]) == 0  # step 6 was a restart
