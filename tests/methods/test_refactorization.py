"""refactorization: preserves B A, balances the factors, idempotent, S and scale untouched, scheduling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimtrain.plugins.refactorization import balanced_factors, refactorize_
from slimtrain.registry import CompositionError, StepContext, compose
from slimtrain.registry.parametrization import originals, parametrization_of

from tests.methods.tiny import TINY, tiny_model


@st.composite
def factors(draw):
    m = draw(st.integers(2, 24))
    n = draw(st.integers(2, 24))
    r = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # unbalanced on purpose: B large, A small
    b = torch.randn(m, r, generator=g) * draw(st.floats(0.1, 10.0))
    a = torch.randn(r, n, generator=g) * draw(st.floats(0.01, 1.0))
    return b, a


def rel(x, y):
    return (torch.linalg.norm(x - y) / torch.linalg.norm(y)).item()


@given(factors())
def test_preserves_product_balances_and_is_idempotent(ba):
    b, a = ba
    nb, na = balanced_factors(b, a)
    assert nb.dtype == torch.float32 and nb.shape == b.shape and na.shape == a.shape
    assert nb.is_contiguous() and na.is_contiguous()
    prod = b.double() @ a.double()
    assert rel(nb.double() @ na.double(), prod) <= 1e-5
    btb, aat = nb.double().T @ nb.double(), na.double() @ na.double().T
    tol = 1e-5 * btb.abs().max()
    assert torch.allclose(btb, aat, atol=tol)
    assert torch.allclose(btb, torch.diag(torch.diagonal(btb)), atol=tol)
    # singular values of the product on the diagonal
    sv = torch.linalg.svdvals(prod)[: b.shape[1]]
    assert torch.allclose(torch.diagonal(btb), sv, rtol=1e-4, atol=1e-5 * sv.max())
    nb2, na2 = balanced_factors(nb, na)
    assert torch.allclose(nb2, nb, atol=1e-4 * nb.abs().max()) and torch.allclose(na2, na, atol=1e-4 * na.abs().max())


def test_bf16_inputs_are_balanced_in_fp32():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(64, 8, generator=g).bfloat16(), torch.randn(8, 48, generator=g).bfloat16() * 0.01
    nb, na = balanced_factors(b, a)
    assert nb.dtype == torch.float32
    assert rel(nb @ na, b.float() @ a.float()) <= 1e-5


def test_zero_product_is_left_alone_and_dead_directions_keep_a_gradient_path():
    a = torch.randn(3, 10)
    assert balanced_factors(torch.zeros(6, 3), a) is None
    b = torch.randn(6, 3)
    b[:, 2] = 0.0  # one dead direction
    nb, na = balanced_factors(b, a)
    assert rel(nb @ na, b @ a) <= 1e-5
    assert torch.count_nonzero(nb[:, 2]) == 0 and torch.linalg.norm(na[2]) > 0.5


@pytest.mark.parametrize(
    "methods,sections",
    [
        (["sltrain", "refactorization"], {"sltrain": {"rank": 4, "delta": 0.1}}),
        (["low_rank", "refactorization"], {"low_rank": {"rank": 4, "alpha": 8.0}}),
        (["lora", "refactorization"], {"lora": {"rank": 4}}),
    ],
)
def test_on_a_model_weights_unchanged_s_and_scale_untouched(methods, sections):
    comp = compose(methods, sections)
    model = tiny_model(comp)
    with torch.no_grad():  # make the products non-trivial (LoRA starts with B = 0)
        for _, mod in ((f, m) for f, m in model.named_modules() if parametrization_of(m) is not None):
            o = originals(mod)
            o["B"].add_(torch.randn(o["B"].shape) * 0.3)
    before = {f: (m.weight.detach().clone(), {k: v.detach().clone() for k, v in originals(m).items()}, parametrization_of(m).scale)
              for f, m in model.named_modules() if parametrization_of(m) is not None}
    x = torch.randint(0, 64, (2, 8))
    y0 = model(x).detach()
    refactor = comp.method("refactorization")
    refactor.after_step(StepContext(refactor.config.every - 1, [model], []))
    for f, (w, o, scale) in before.items():
        mod = model.get_submodule(f)
        assert all(torch.equal(o[k], v) for k, v in originals(mod).items()), f"step not a multiple of every moved {f}"
    refactor.after_step(StepContext(refactor.config.every, [model], []))
    for f, (w, o, scale) in before.items():
        mod = model.get_submodule(f)
        new = originals(mod)
        assert not torch.equal(new["B"], o["B"]), f
        assert rel(mod.weight.detach(), w) <= 1e-5, f
        assert parametrization_of(mod).scale == scale
        for role in set(o) - {"B", "A"}:
            assert torch.equal(new[role], o[role]), (f, role)
        assert torch.allclose(new["B"].T @ new["B"], new["A"] @ new["A"].T, atol=1e-5)
    assert torch.allclose(model(x), y0, atol=1e-4)
    assert refactorize_(model) == len(before)


def test_requires_a_factorized_method():
    with pytest.raises(CompositionError, match="refactorization.*requires a factorized parametrization.*low_rank"):
        compose(["refactorization"])
    with pytest.raises(Exception, match=r"\[refactorization\] every"):
        compose(["low_rank", "refactorization"], {"refactorization": {"every": 0}})
