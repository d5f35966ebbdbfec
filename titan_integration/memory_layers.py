"""The trainer side of memory layers: methods that change how the composed optimizer stores its
state (``Capability.STATE_CODEC``) or WHEN it steps (``Capability.STEPPER``), not what a rule computes.

Nothing here knows a method by name: ``build_optimizers`` wraps slimtrain.titan_integration.optimizer's
builder, then puts the composition's memory layers on every model part's ``ComposedOptimizer``
(``Composition.install_memory_layers``: its state codec, then its stepper), as ``slimtrain.prepare`` does. ``check_job`` reads
the trainer settings a layer may be unable to honour from the job config (``TrainerSettings``) and
asks every method (``Method.check_trainer``), before a model is built
(``slimtrain.titan_integration.context.build_composition`` calls it).

``training.max_norm <= 0`` means "no clipping" for every composition: torchtitan would clip every
gradient to zero (0) or flip its sign (negative), so the job config's value is replaced by ``inf``
(torchtitan's clip is then the identity) and logged. NaN is refused.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from slimtrain.registry import ConfigError, TrainerSettings

log = logging.getLogger("slimtrain")


def grad_accumulation_steps(job_config: Any) -> int:
    """torchtitan's count: global batch / (local batch x data-parallel ranks); -1 means none."""
    t = job_config.training
    if t.global_batch_size is None or t.global_batch_size <= 0:
        return 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, t.global_batch_size // (t.local_batch_size * world))


def no_clipping_below_zero(job_config: Any) -> None:
    """``training.max_norm <= 0``: no clipping (see the module docstring); NaN refused."""
    max_norm = float(job_config.training.max_norm)
    if math.isnan(max_norm):
        raise ConfigError("[training] max_norm = nan; allowed: a number > 0 (clip), or <= 0 / inf (no clipping)")
    if max_norm <= 0:
        log.info("slimtrain: training.max_norm = %s: no gradient clipping", max_norm)
        job_config.training.max_norm = math.inf


def trainer_settings(job_config: Any) -> TrainerSettings:
    return TrainerSettings(
        max_norm=float(job_config.training.max_norm), grad_accumulation_steps=grad_accumulation_steps(job_config),
    )


def check_job(job_config: Any, composition) -> None:
    if getattr(job_config.optimizer, "early_step_in_backward", False):
        raise ConfigError(
            "optimizer.early_step_in_backward = True: slimtrain does not build torchtitan's per-parameter "
            "optimizers; add a stepper method that steps in backward to [slimtrain] methods (`slimtrain list` "
            "shows the installed ones)"
        )
    no_clipping_below_zero(job_config)
    composition.implementation = getattr(job_config.optimizer, "implementation", "foreach")
    composition.check_trainer(trainer_settings(job_config))


def build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager=None):
    """slimtrain.titan_integration.optimizer.build_optimizers, then the memory layers on each optimizer."""
    from slimtrain.titan_integration import context, optimizer

    run = context.current()
    comp = run.composition
    container = optimizer.build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    settings = trainer_settings(run.job_config)
    steppers = [comp.install_memory_layers(opt, settings) for opt in container.optimizers]
    container.steppers = [s for s in steppers if s is not None]
    return container
