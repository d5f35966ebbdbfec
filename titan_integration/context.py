"""The run's composition, shared by the converter, the optimizer and LR-scheduler builders.

Why a module-level slot: torchtitan builds the converter (which sees the job config) and later
calls ``build_optimizers_fn(model_parts, optimizer_config, parallel_dims)`` and
``build_lr_schedulers_fn(optimizers, lr_scheduler_config, steps)``, which do not. All three must
use the same composition object (the optimizer's step hooks and LR factors belong to the methods
that parametrized the model), so the converter stores it here, keyed by the job config it was
built from. One training run per process, as torchtitan itself assumes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from slimtrain.registry import Composition, compose

from slimtrain.titan_integration.job_config import non_default_keys, section_values

log = logging.getLogger("slimtrain")


@dataclasses.dataclass
class RunState:
    job_config: Any
    composition: Composition
    parametrized: list[str] = dataclasses.field(default_factory=list)


_STATE: RunState | None = None


def method_names(job_config: Any) -> list[str]:
    section = getattr(job_config, "slimtrain", None)
    if section is None:
        raise RuntimeError(
            "the job config has no [slimtrain] section: set [job] custom_config_module = "
            '"slimtrain.titan_integration.job_config" (titan_integration/train.py adds it for you)'
        )
    if isinstance(section.methods, str):
        from slimtrain.registry import ConfigError

        raise ConfigError(f"[slimtrain] methods = {section.methods!r}: allowed: a list of method names, "
                          f'e.g. methods = ["{section.methods}"]')
    names: list[str] = []
    for item in section.methods:
        names.extend(part.strip() for part in str(item).split(",") if part.strip())
    return names


def build_composition(job_config: Any) -> Composition:
    """``slimtrain.registry.compose`` on ``[slimtrain] methods`` and their sections. Raises the registry's
    CompositionError / ConfigError; no model is needed (or built) for any of its checks."""
    names = method_names(job_config)
    sections = {name: section_values(job_config, name) for name in names}
    composition = compose(names, sections)
    from slimtrain.titan_integration.memory_layers import check_job

    check_job(job_config, composition)  # state_8bit / per_layer_updates vs trainer settings
    from slimtrain.registry import get_methods

    for other in get_methods():
        if other not in composition.method_names:
            changed = non_default_keys(job_config, other)
            if changed:
                log.warning(
                    "[%s] %s set, but %r is not in [slimtrain] methods: these settings have no effect",
                    other, ", ".join(changed), other,
                )
    return composition


def composition_for(job_config: Any) -> Composition:
    """The composition for ``job_config``, built once per job config."""
    global _STATE
    if _STATE is None or _STATE.job_config is not job_config:
        _STATE = RunState(job_config, build_composition(job_config))
    return _STATE.composition


def current() -> RunState:
    if _STATE is None:
        raise RuntimeError(
            "no slimtrain composition: the 'slimtrain' model converter was not built. Add it to "
            '[model] converters = ["slimtrain"] (titan_integration/train.py adds it for you)'
        )
    return _STATE


def reset() -> None:
    """Forget the run (tests that build several trainers in one process)."""
    global _STATE
    _STATE = None
