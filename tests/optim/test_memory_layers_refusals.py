"""The memory layers refuse, before a model is built, an optimizer method whose update rule declares
no state: state_8bit has no moment to store in 8 bits, per_layer_updates cannot step it one
parameter at a time through declared state. The check runs from the job config
(slimtrain.titan_integration.memory_layers.check_job, called by the trainer before the model is built)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from slimtrain.registry import DEFAULT_TARGETS, Capability, ConfigError, Method, compose, hookimpl
from slimtrain.registry.manager import register_plugin, unregister_plugin
from slimtrain.registry.update_rule import UpdateRule


@dataclasses.dataclass(frozen=True)
class _SignConfig:
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)


class _SignRule(UpdateRule):
    """signSGD: a legitimate rule that keeps no state, so it does not override state_specs."""

    needs_matrix = False

    def step(self, params, info) -> None:
        for p in params:
            p.param.add_(p.grad.sign(), alpha=-info.lr)


class _StatelessSign(Method):
    name = "stateless_sign"
    summary = "test: signSGD without declared state"
    Config = _SignConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def update_rule(self) -> _SignRule:
        return _SignRule()


class _Plugin:
    @hookimpl
    def register_methods(self, register):
        register(_StatelessSign)


@pytest.fixture
def stateless_method():
    register_plugin(_Plugin(), "test-stateless-sign")
    yield "stateless_sign"
    unregister_plugin("test-stateless-sign")


def _job(max_norm: float = 0.0) -> SimpleNamespace:
    return SimpleNamespace(
        optimizer=SimpleNamespace(early_step_in_backward=False),
        training=SimpleNamespace(max_norm=max_norm, global_batch_size=-1, local_batch_size=2),
    )


@pytest.mark.parametrize("layer", ["state_8bit", "per_layer_updates"])
def test_a_rule_without_declared_state_is_refused_naming_layer_and_method(stateless_method, layer):
    from slimtrain.titan_integration.memory_layers import check_job

    comp = compose([stateless_method, layer], {})
    with pytest.raises(ConfigError, match=rf"\[{layer}\] optimizer method 'stateless_sign' declares no state"):
        check_job(_job(), comp)


def test_the_refusal_is_the_memory_layers_own(stateless_method):
    """Without a memory layer the same composition passes the job check, and with a rule that
    declares its state (adamw) the memory layers pass too: the refusal names the undeclared rule."""
    from slimtrain.titan_integration.memory_layers import check_job

    check_job(_job(), compose([stateless_method], {}))
    check_job(_job(), compose(["adamw", "state_8bit", "per_layer_updates"], {}))
