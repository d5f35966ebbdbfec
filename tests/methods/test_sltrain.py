"""sltrain: the sparse support, the forward, the memory-saving autograd function, init, checkpointing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimtrain.plugins.sltrain import SparseLowRankLinear, draw_support
from slimtrain.registry import ConfigError, compose
from slimtrain.registry.parametrization import attach, originals, parametrization_of

from tests.methods.tiny import TINY, tiny_model


def dense_sparse(values, index, m, n):
    s = torch.zeros(m, n, dtype=values.dtype)
    for v, i in zip(values.tolist(), index.tolist()):
        s[i // n, i % n] = v
    return s


@given(st.integers(4, 40), st.integers(4, 40), st.floats(0.02, 0.6), st.integers(0, 2**20))
def test_support_properties(m, n, delta, seed):
    idx = draw_support(seed, "layers.0.attention.wq", m, n, delta)
    assert idx.dtype == torch.int64
    assert idx.numel() == round(delta * m * n)
    assert idx.unique().numel() == idx.numel()
    assert idx.numel() == 0 or (idx.min() >= 0 and idx.max() < m * n)
    assert torch.equal(idx, draw_support(seed, "layers.0.attention.wq", m, n, delta))
    if 0 < idx.numel() < m * n - 4:
        assert not torch.equal(idx, draw_support(seed, "layers.0.attention.wk", m, n, delta))
        assert not torch.equal(idx, draw_support(seed + 1, "layers.0.attention.wq", m, n, delta))


@given(st.integers(2, 12), st.integers(2, 12), st.integers(1, 12), st.floats(0.05, 0.9), st.floats(0.5, 64), st.integers(0, 2**20))
def test_forward_is_scaled_ba_plus_dense_s(m, n, r, delta, alpha, seed):
    r = min(r, m, n)
    method = compose(["sltrain"], {"sltrain": {"rank": r, "alpha": alpha, "delta": delta, "seed": seed}}).method("sltrain")
    linear = nn.Linear(n, m, bias=False, dtype=torch.float64)
    if round(delta * m * n) < 1:
        with pytest.raises(ConfigError, match="empty support"):
            method.make_parametrization(linear, "l.w")
        return
    attach(linear, method.make_parametrization(linear, "l.w"))
    p = parametrization_of(linear)
    g = torch.Generator().manual_seed(seed)
    o = originals(linear)
    with torch.no_grad():
        for t in o.values():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
    expected = alpha / r * o["B"] @ o["A"] + dense_sparse(o["S"], p.index, m, n)
    assert torch.allclose(linear.weight, expected, rtol=1e-12, atol=1e-12)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    p.forward = lambda *a: (_ for _ in ()).throw(AssertionError("forward went through the parametrization"))
    assert torch.allclose(linear(x), x @ expected.T, rtol=1e-10, atol=1e-10)


def test_gradcheck_of_the_autograd_function():
    g = torch.Generator().manual_seed(0)
    m, n, r = 5, 4, 2
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(m, r, generator=g, **{"dtype": torch.float64}).requires_grad_()
    a = torch.randn(r, n, generator=g, dtype=torch.float64).requires_grad_()
    index = draw_support(0, "w", m, n, 0.4)
    values = torch.randn(index.numel(), **kw)
    assert torch.autograd.gradcheck(lambda *t: SparseLowRankLinear.apply(*t, index, 0.7), (x, b, a, values))
    # and it matches autograd through the dense formula
    y = SparseLowRankLinear.apply(x, b, a, values, index, 0.7)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, b, a, values), gy)
    w = 0.7 * b @ a + torch.zeros(m * n, dtype=torch.float64).index_put((index,), values).view(m, n)
    want = torch.autograd.grad(x @ w.T, (x, b, a, values), gy)
    for g1, g2 in zip(got, want):
        assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)


def test_no_dense_weight_is_kept_for_backward():
    m, n, r = 48, 40, 4
    method = compose(["sltrain"], {"sltrain": {"rank": r}}).method("sltrain")
    linear = nn.Linear(n, m, bias=False)
    attach(linear, method.make_parametrization(linear, "l.w"))
    x = torch.randn(7, n, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = linear(x)
    assert saved and (m, n) not in saved and (n, m) not in saved, saved
    y.sum().backward()
    assert all(t.grad is not None for t in originals(linear).values())
    # sanity: the dense path does keep it, so the check above can fail
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        nn.functional.linear(x, linear.parametrizations.weight[0](*originals(linear).values()))
    assert (m, n) in saved or (n, m) in saved


def test_init_as_the_reference_and_index_in_state_dict():
    comp = compose(["sltrain"], {"sltrain": {"rank": 4, "delta": 0.05, "seed": 3}})
    model = tiny_model(comp)
    for fqn, mod in model.named_modules():
        p = parametrization_of(mod)
        if p is None:
            continue
        o = originals(mod)
        m, n = mod.out_features, mod.in_features
        assert torch.count_nonzero(o["B"]) == 0
        assert 0 < o["A"].abs().max() <= 1 / n**0.5 + 1e-7
        assert 0 < o["S"].abs().max() <= 1 / n**0.5 + 1e-7
        assert torch.equal(p.index, draw_support(3, fqn, m, n, 0.05))
    sd = model.state_dict()
    key = "layers.1.feed_forward.w3.parametrizations.weight.0.index"
    assert key in sd and sd[key].dtype == torch.int64
    # A resumed model (fresh support drawn from another seed) gets the saved support back.
    other = tiny_model(compose(["sltrain"], {"sltrain": {"rank": 4, "delta": 0.05, "seed": 4}}))
    assert not torch.equal(other.state_dict()[key], sd[key])
    other.load_state_dict(sd)
    assert torch.equal(other.state_dict()[key], sd[key])
    x = torch.randint(0, 64, (2, 8))
    assert torch.equal(other(x), model(x))


def test_delta_out_of_range_is_an_error():
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"\[sltrain\] delta"):
            compose(["sltrain"], {"sltrain": {"delta": bad}})


def test_bad_rank_names_the_weight_and_shape():
    comp = compose(["sltrain"], {"sltrain": {"rank": 64, "targets": "wo"}})
    with pytest.raises(ConfigError, match=r"layers\.0\.attention\.wo\.weight of shape \(32, 32\)"):
        tiny_model(comp)


def test_support_is_uniform_over_positions():
    from slimtrain.plugins.sltrain import draw_support

    counts = torch.zeros(6 * 5)
    draws = 3000
    for seed in range(draws):
        counts[draw_support(seed, "w", 6, 5, 0.2)] += 1  # 6 of 30 positions each time
    expected = draws * 6 / 30
    # binomial std is about 22 here: every position within 5 std of its expectation
    assert (counts - expected).abs().max() < 5 * (draws * 0.2 * 0.8) ** 0.5
