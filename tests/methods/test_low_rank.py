"""low_rank: best rank-r approximation on assignment, factored forward, init that trains, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimtrain.registry import ConfigError, OptimizerHyper, StepContext, compose
from slimtrain.registry.parametrization import attach, originals, parametrization_of

from tests.methods.tiny import TINY, tiny_model


def parametrized_linear(m: int, n: int, rank: int, alpha=None, w=None) -> nn.Linear:
    method = compose(["low_rank"], {"low_rank": {"rank": rank, "alpha": alpha}}).method("low_rank")
    linear = nn.Linear(n, m, bias=False, dtype=torch.float64)
    if w is not None:
        with torch.no_grad():
            linear.weight.copy_(w)
    attach(linear, method.make_parametrization(linear, "layer.w"))
    return linear


@st.composite
def matrix_and_rank(draw):
    m = draw(st.integers(2, 12))
    n = draw(st.integers(2, 12))
    r = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 2**31 - 1))
    alpha = draw(st.one_of(st.none(), st.floats(0.5, 64.0)))
    return m, n, r, seed, alpha


@given(matrix_and_rank())
def test_assignment_gives_best_rank_r_approximation(case):
    m, n, r, seed, alpha = case
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    linear = parametrized_linear(m, n, r, alpha, w)
    approx = linear.weight.detach()
    assert torch.linalg.matrix_rank(approx) <= r
    s = torch.linalg.svdvals(w)
    expected = s[r:].square().sum().sqrt()
    assert torch.allclose(torch.linalg.norm(w - approx), expected, rtol=1e-6, atol=1e-9)
    # Balanced factors: B^T B == A A^T (both diag(S_r / scale)).
    o = originals(linear)
    assert torch.allclose(o["B"].T @ o["B"], o["A"] @ o["A"].T, atol=1e-8)


@given(matrix_and_rank(), st.integers(1, 12))
def test_exact_when_rank_fits(case, k):
    m, n, r, seed, alpha = case
    k = min(k, r)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)
    linear = parametrized_linear(m, n, r, alpha, w)
    assert torch.allclose(linear.weight, w, rtol=1e-9, atol=1e-9)


@given(matrix_and_rank())
def test_factored_forward_equals_dense_and_never_builds_w(case):
    m, n, r, seed, alpha = case
    g = torch.Generator().manual_seed(seed)
    linear = parametrized_linear(m, n, r, alpha, torch.randn(m, n, generator=g, dtype=torch.float64))
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    dense = nn.functional.linear(x, linear.weight)
    p = parametrization_of(linear)
    p.forward = lambda *a: (_ for _ in ()).throw(AssertionError("W materialized"))  # type: ignore[method-assign]
    assert torch.allclose(linear(x), dense, rtol=1e-10, atol=1e-10)


def test_initialization_trains_both_factors_of_every_layer():
    comp = compose(["low_rank"], {"low_rank": {"rank": 4}})
    model = tiny_model(comp)
    scale_std = [parametrization_of(lin).scale * (o["B"] @ o["A"]).std().item()
                 for lin, o in ((mod, originals(mod)) for mod in model.modules() if parametrization_of(mod))]
    assert all(0.005 < s < 0.08 for s in scale_std), scale_std  # near torchtitan's 0.02 init
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-2))
    x = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    for step in (1, 2):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        comp.after_step(StepContext(step, [model], [opt]))
    factors = [n for n in before if ".original" in n]
    assert len(factors) == 2 * 7 * TINY["n_layers"]
    still = [n for n in factors if torch.equal(before[n], dict(model.named_parameters())[n])]
    assert not still, f"factors that did not train: {still}"


def test_kaiming_init_option_and_seed_determinism():
    comp = compose(["low_rank"], {"low_rank": {"rank": 4, "init": "kaiming"}})
    a = tiny_model(comp, seed=0)
    b = tiny_model(comp, seed=123)  # model seed does not matter: factor draws come from (seed, fqn)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        if ".original" in na:
            assert torch.equal(pa, pb), na
    A = originals(a.get_submodule("layers.0.attention.wq"))["A"]
    assert A.abs().max() <= 1 / TINY["dim"] ** 0.5 + 1e-7
    other = tiny_model(compose(["low_rank"], {"low_rank": {"rank": 4, "init": "kaiming", "seed": 1}}))
    assert not torch.equal(originals(other.get_submodule("layers.0.attention.wq"))["A"], A)


def test_meta_assignment_has_factor_shapes():
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    comp = compose(["low_rank"], {"low_rank": {"rank": 4}})
    with torch.device("meta"):
        model = Transformer(TransformerModelArgs(**TINY))
    comp.apply_parametrizations(model)
    o = originals(model.get_submodule("layers.1.feed_forward.w2"))
    assert o["B"].shape == (32, 4) and o["A"].shape == (4, model.get_submodule("layers.1.feed_forward.w2").in_features)
    assert o["B"].is_meta and o["B"].is_contiguous() and o["A"].is_contiguous()
    # Embeddings, norms and the output head stay dense.
    assert parametrization_of(model.output) is None
    assert not any(".original" in n for n, _ in model.tok_embeddings.named_parameters())


def test_bad_rank_names_the_weight_and_shape():
    with pytest.raises(ConfigError, match=r"rank"):
        compose(["low_rank"], {"low_rank": {"rank": 0}})
    comp = compose(["low_rank"], {"low_rank": {"rank": 33}})
    with pytest.raises(ConfigError, match=r"layers\.0\.attention\.wq\.weight of shape \(32, 32\)"):
        tiny_model(comp)


def test_targets_matching_nothing_lists_candidates():
    comp = compose(["low_rank"], {"low_rank": {"rank": 2, "targets": "q_proj,up_proj"}})
    with pytest.raises(ConfigError, match=r"match no Linear.*candidate names: .*w1.*wq"):
        tiny_model(comp)


def test_targets_select_a_subset():
    comp = compose(["low_rank"], {"low_rank": {"rank": 2, "targets": "attention.*"}})
    model = tiny_model(comp)
    parametrized = {fqn.rsplit(".", 1)[-1] for fqn, mod in model.named_modules() if parametrization_of(mod)}
    assert parametrized == {"wq", "wk", "wv", "wo"}


def test_init_does_not_depend_on_activation_checkpoint_wrappers():
    """torchtitan wraps blocks for activation checkpointing before init: the factors' seeds come
    from the weight's name without the wrapper's segment, so AC on or off gives the same model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    comp = compose(["low_rank"], {"low_rank": {"rank": 4}})
    plain = tiny_model(comp)
    with torch.device("meta"):
        wrapped = Transformer(TransformerModelArgs(**TINY))
    comp.apply_parametrizations(wrapped)
    for key, block in list(wrapped.layers.items()):
        wrapped.layers[key] = checkpoint_wrapper(block)
    wrapped.to_empty(device="cpu")
    torch.manual_seed(0)
    with comp.capture_init(), torch.no_grad():
        wrapped.init_weights()
    comp.init_parametrized(wrapped)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    a = {n.replace("._checkpoint_wrapped_module", ""): p for n, p in wrapped.named_parameters()}
    for name, p in plain.named_parameters():
        assert torch.equal(a[name], p), name
