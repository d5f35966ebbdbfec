"""lora: W0 is the model's own init and frozen; A kaiming, B zero; factored forward; bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimtrain.registry import ConfigError, OptimizerHyper, compose
from slimtrain.registry.parametrization import attach, originals, parametrization_of

from tests.methods.tiny import TINY, tiny_model


def test_w0_is_the_models_own_init_and_layer_starts_as_w0():
    comp = compose(["lora"], {"lora": {"rank": 4}})
    dense = tiny_model(None, seed=7)
    lora = tiny_model(comp, seed=7)
    n = 0
    for fqn, mod in lora.named_modules():
        p = parametrization_of(mod)
        if p is None:
            continue
        o = originals(mod)
        ref = dense.get_submodule(fqn).weight
        assert torch.equal(o["W0"], ref), fqn
        assert torch.equal(mod.weight, ref), fqn  # B = 0: the layer is exactly W0
        assert not o["W0"].requires_grad and o["B"].requires_grad and o["A"].requires_grad
        assert torch.count_nonzero(o["B"]) == 0
        bound = 1 / mod.in_features**0.5
        assert 0 < o["A"].abs().max() <= bound + 1e-7
        n += 1
    assert n == 7 * TINY["n_layers"]
    x = torch.randint(0, 64, (2, 8))
    assert torch.allclose(lora(x), dense(x), atol=1e-6)


def test_without_capture_w0_is_not_the_models_init():
    # The trap the capture exists for: without it the init's writes are lost.
    comp = compose(["lora"], {"lora": {"rank": 4}})
    dense = tiny_model(None, seed=7)
    lora = tiny_model(comp, seed=7, capture=False)
    assert not torch.equal(originals(lora.get_submodule("layers.0.attention.wq"))["W0"], dense.layers["0"].attention.wq.weight)


def test_only_factors_train():
    comp = compose(["lora"], {"lora": {"rank": 4}})
    model = tiny_model(comp)
    groups = comp.param_groups(model)
    trained = {id(p) for g in groups for p in g["params"]}
    for fqn, mod in model.named_modules():
        if parametrization_of(mod) is not None:
            o = originals(mod)
            assert id(o["W0"]) not in trained and id(o["B"]) in trained and id(o["A"]) in trained
    w0 = originals(model.layers["0"].attention.wq)["W0"].detach().clone()
    opt = comp.build_optimizer(groups, OptimizerHyper(lr=1e-2))
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
        opt.step()
        opt.zero_grad()
    o = originals(model.layers["0"].attention.wq)
    assert torch.equal(o["W0"], w0)
    assert torch.count_nonzero(o["B"]) > 0


@given(st.integers(2, 10), st.integers(2, 10), st.integers(1, 10), st.floats(0.5, 64), st.integers(0, 2**31 - 1))
def test_forward_is_w0_plus_scaled_ba_and_factored(m, n, r, alpha, seed):
    r = min(r, m, n)
    method = compose(["lora"], {"lora": {"rank": r, "alpha": alpha}}).method("lora")
    linear = nn.Linear(n, m, bias=True, dtype=torch.float64)
    attach(linear, method.make_parametrization(linear, "x.w"))
    g = torch.Generator().manual_seed(seed)
    o = originals(linear)
    with torch.no_grad():
        for t in o.values():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
    expected_w = o["W0"] + alpha / r * o["B"] @ o["A"]
    assert torch.allclose(linear.weight, expected_w, rtol=1e-12, atol=1e-12)
    x = torch.randn(4, n, generator=g, dtype=torch.float64)
    dense = nn.functional.linear(x, expected_w, linear.bias)
    parametrization_of(linear).forward = lambda *a: (_ for _ in ()).throw(AssertionError("W materialized"))
    assert torch.allclose(linear(x), dense, rtol=1e-10, atol=1e-10)


def test_bad_rank_names_the_weight_and_shape():
    with pytest.raises(ConfigError, match="rank"):
        compose(["lora"], {"lora": {"rank": -1}})
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    with torch.device("meta"):
        model = Transformer(TransformerModelArgs(**TINY))
    comp = compose(["lora"], {"lora": {"rank": 40, "targets": "w2"}})
    with pytest.raises(ConfigError, match=r"layers\.0\.feed_forward\.w2\.weight of shape \(32, 96\)"):
        comp.apply_parametrizations(model)
