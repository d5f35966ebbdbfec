"""Memory layers in the method contract: bad compositions and trainer settings are refused before a
model is built, naming the methods, the key and the value. A state codec or a stepper cannot serve an
optimizer method whose rule declares no state; two codecs, or two steppers (both wanting to own when
the step happens), are refused; a layer's ``check_trainer`` refuses accumulation it cannot honour;
a codec that serves none of a rule's declarations on the model's shapes is refused by the preflight;
``training.max_norm <= 0`` means no clipping (never clipping every gradient to zero)."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from types import SimpleNamespace

import pytest

from slimtrain.registry import (
    DEFAULT_TARGETS, Capability, CompositionError, ConfigError, Method, TrainerSettings, compose, hookimpl,
)
from slimtrain.registry.composed_optimizer import StateCodec
from slimtrain.registry.manager import register_plugin, unregister_plugin
from slimtrain.registry.update_rule import StateSpec, UpdateRule

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


class _ScalarOnlyRule(_SignRule):
    """Declares state, but no moment a codec could store (a step count only)."""

    def state_specs(self, spec):
        return [StateSpec("count", ())]


class _ScalarOnly(_StatelessSign):
    name = "scalar_only"

    def update_rule(self) -> _ScalarOnlyRule:
        return _ScalarOnlyRule()


class _OtherStepper(Method):
    """A second stepper, that cannot honour gradient accumulation."""

    name = "other_stepper"
    summary = "test: a stepper refusing accumulation"
    provides = frozenset({Capability.STEPPER})

    def attach_stepper(self, optimizer, settings):
        raise AssertionError("not attached in these tests")

    def check_trainer(self, settings: TrainerSettings) -> None:
        if settings.grad_accumulation_steps != 1:
            raise ConfigError(
                f"[{self.name}] gradient accumulation steps = {settings.grad_accumulation_steps}: steps on every backward"
            )


class _OtherCodec(Method):
    name = "other_codec"
    summary = "test: a second state codec"
    provides = frozenset({Capability.STATE_CODEC})

    def state_codec(self):
        return StateCodec()


class _Plugin:
    @hookimpl
    def register_methods(self, register):
        for cls in (_StatelessSign, _ScalarOnly, _OtherStepper, _OtherCodec):
            register(cls)


@pytest.fixture
def test_methods():
    register_plugin(_Plugin(), "test-memory-layer-refusals")
    yield
    unregister_plugin("test-memory-layer-refusals")


def _job(max_norm: float = 0.0, global_batch: int = -1) -> SimpleNamespace:
    return SimpleNamespace(
        optimizer=SimpleNamespace(early_step_in_backward=False, implementation="foreach"),
        training=SimpleNamespace(max_norm=max_norm, global_batch_size=global_batch, local_batch_size=2),
    )


@pytest.mark.parametrize("layer", ["state_8bit", "per_layer_updates"])
def test_a_rule_without_declared_state_is_refused_naming_layer_and_method(test_methods, layer):
    with pytest.raises(ConfigError, match=rf"\[{layer}\] optimizer method 'stateless_sign' declares no state"):
        compose(["stateless_sign", layer], {})


def test_the_refusal_is_the_memory_layers_own(test_methods):
    """Without a memory layer the same composition passes, and with a rule that declares its state
    (adamw) the memory layers pass too: the refusal names the undeclared rule."""
    from slimtrain.titan_integration.memory_layers import check_job

    check_job(_job(), compose(["stateless_sign"], {}))
    check_job(_job(), compose(["adamw", "state_8bit", "per_layer_updates"], {}))


def test_two_steppers_are_refused_naming_both(test_methods):
    with pytest.raises(CompositionError, match=r"'per_layer_updates' and 'other_stepper' both want to own when"):
        compose(["adamw", "per_layer_updates", "other_stepper"], {})


def test_two_codecs_are_refused_naming_both(test_methods):
    with pytest.raises(CompositionError, match=r"'state_8bit' and 'other_codec' both store the optimizer state"):
        compose(["adamw", "state_8bit", "other_codec"], {})


def test_accumulation_a_layer_cannot_honour_is_refused_from_the_job(test_methods, monkeypatch):
    from slimtrain.titan_integration.memory_layers import check_job

    monkeypatch.setenv("WORLD_SIZE", "1")
    comp = compose(["adamw", "other_stepper"], {})
    check_job(_job(global_batch=2), comp)  # one micro-batch: fine
    with pytest.raises(ConfigError, match=r"\[other_stepper\] gradient accumulation steps = 4"):
        check_job(_job(global_batch=8), comp)
    # per_layer_updates honours accumulation
    check_job(_job(global_batch=8), compose(["adamw", "per_layer_updates"], {}))


def test_a_codec_serving_no_state_of_a_rule_is_refused_before_the_model(test_methods):
    from slimtrain.registry import llama_dense_specs  # noqa: F401  (the flavor's shapes)
    from slimtrain.titan_integration.flavors import FLAVORS
    from slimtrain.titan_integration.preflight import check_shapes

    comp = compose(["scalar_only", "state_8bit"], {})
    with pytest.raises(ConfigError, match=r"\[state_8bit\] stores none of the state optimizer method 'scalar_only'"):
        check_shapes(comp, FLAVORS["nano"])
    check_shapes(compose(["galore", "state_8bit"], {"galore": {"rank": 4}}), FLAVORS["nano"])


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_max_norm_zero_or_negative_means_no_clipping(value):
    from slimtrain.titan_integration.memory_layers import check_job

    job = _job(max_norm=value)
    check_job(job, compose(["adamw"], {}))
    assert job.training.max_norm == math.inf  # torchtitan's clip is the identity, not a zeroing
    job = _job(max_norm=value)
    check_job(job, compose(["adamw", "per_layer_updates"], {}))
    assert job.training.max_norm == math.inf
    job = _job(max_norm=0.5)
    check_job(job, compose(["adamw"], {}))
    assert job.training.max_norm == 0.5


def test_max_norm_nan_is_refused_naming_key_and_value():
    from slimtrain.titan_integration.memory_layers import check_job

    with pytest.raises(ConfigError, match=r"\[training\] max_norm = nan"):
        check_job(_job(max_norm=float("nan")), compose(["adamw"], {}))


def _code_strings(source: str) -> list[str]:
    """String constants of ``source`` that are code, not docstrings (f-string parts included)."""
    import ast

    tree = ast.parse(source)
    # docstrings: module/class/function ones and attribute docstrings (a bare string statement)
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


#: manager.py lists the built-in modules; flavors.py is the per-flavor table of the papers' settings
#: (a data table of recipe values, not code that treats a method specially)
SKIP = ("manager.py", "flavors.py")


def test_no_code_under_registry_or_titan_integration_names_a_built_in_method():
    """The contract carries memory layers and rules: the trainer, the optimizer and the memory models
    know no built-in method by name (no string in their code names one). Allowed: ``adamw``, the
    contract's named default rule (composition.DEFAULT_OPTIMIZER), and ``scale``, which is also the
    factor role every FACTORIZED parametrization has."""
    from slimtrain.registry import get_methods

    names = {n for n, info in get_methods().items() if info.source == "built-in"} - {"adamw", "scale"}
    assert {"state_8bit", "per_layer_updates", "galore", "apollo_mini", "sltrain"} <= names
    found = []
    for folder in ("registry", "titan_integration"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in SKIP:
                continue
            for text in _code_strings(path.read_text()):
                found += [f"{path.relative_to(ROOT)}: {text!r}" for n in names if re.search(rf"\b{n}\b", text)]
    assert not found, found


def test_the_name_check_can_fail():
    assert _code_strings('"""state_8bit here is a docstring"""\nX = "state_8bit"\n') == ["state_8bit"]
