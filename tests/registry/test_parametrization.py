"""The shared parametrization machinery: meta-device attach, frozen roles, init capture, forward routing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtrain.registry.parametrization import (
    LinearParametrization,
    attach,
    capture_init,
    capturing_init,
    iter_parametrized,
    originals,
)


class WithBase(LinearParametrization):
    """W = W0 + D, W0 frozen; returns W0 itself while init is captured."""

    roles = ("W0", "D")
    frozen_roles = frozenset({"W0"})
    calls = 0

    def forward(self, W0, D):
        if capturing_init():
            return W0
        return W0 + D

    def right_inverse(self, W):
        return (W, torch.zeros_like(W))

    def initialize(self, originals, fqn):
        originals["D"].zero_()

    def linear_forward(self, x, originals, bias):
        type(self).calls += 1
        W0, D = originals
        return x @ W0.T + x @ D.T + (bias if bias is not None else 0)


def _linear(device="cpu"):
    lin = nn.Linear(5, 3, device=device)
    attach(lin, WithBase("with_base", 3, 5))
    return lin


def test_model_init_writes_into_base_only_while_captured():
    lin = _linear()
    with capture_init():
        nn.init.constant_(lin.weight, 2.0)
    assert torch.all(originals(lin)["W0"] == 2.0)
    nn.init.constant_(lin.weight, 7.0)  # uncaptured: goes to a temporary, lost
    assert torch.all(originals(lin)["W0"] == 2.0)


def test_frozen_role_does_not_train_and_forward_is_routed():
    lin = _linear()
    assert not originals(lin)["W0"].requires_grad and originals(lin)["D"].requires_grad
    before = WithBase.calls
    x = torch.randn(4, 5)
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
    assert WithBase.calls == before + 1


def test_routing_touches_only_the_parametrized_layer():
    plain = nn.Linear(5, 3)
    _linear()
    assert type(plain).forward is nn.Linear.forward


def test_attach_twice_is_an_error():
    lin = _linear()
    with pytest.raises(ValueError, match="already parametrized by 'with_base'"):
        attach(lin, WithBase("other", 3, 5))


def test_meta_then_to_empty_then_initialize():
    model = nn.Sequential(nn.Linear(5, 3, device="meta"))
    attach(model[0], WithBase("with_base", 3, 5))
    assert originals(model[0])["W0"].is_meta
    model.to_empty(device="cpu")
    found = list(iter_parametrized(model))
    assert [fqn for fqn, _, _ in found] == ["0"]
    fqn, lin, p = found[0]
    with torch.no_grad():
        p.initialize(originals(lin), fqn)
    assert torch.all(originals(lin)["D"] == 0)
    assert not originals(lin)["W0"].requires_grad  # to_empty keeps requires_grad


def test_state_dict_names_are_stable():
    keys = set(_linear().state_dict())
    assert keys == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
