"""The trainer side of the memory layers: 8-bit optimizer state and per-layer updates.

Both are methods without hooks into the composition (they change how the composed optimizer
stores state and WHEN it steps, not what it computes), so the trainer installs them on the built
optimizers: ``build_optimizers`` wraps slimtrain.titan_integration.optimizer's builder, then installs
``state_8bit``'s codec (``slimtrain.plugins.state_8bit.install_codec``) and ``per_layer_updates``'s hooks
(``slimtrain.plugins.per_layer_updates.PerLayerStepper``) on every model part's ``ComposedOptimizer``.
``check_job`` refuses what they cannot honour from the job config alone, before a model is built
(``slimtrain.titan_integration.context.build_composition`` calls it).
"""

from __future__ import annotations

import os
from typing import Any

from slimtrain.registry import ConfigError

STATE_8BIT = "state_8bit"
PER_LAYER = "per_layer_updates"


def grad_accumulation_steps(job_config: Any) -> int:
    """torchtitan's count: global batch / (local batch x data-parallel ranks); -1 means none."""
    t = job_config.training
    if t.global_batch_size is None or t.global_batch_size <= 0:
        return 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, t.global_batch_size // (t.local_batch_size * world))


def check_job(job_config: Any, composition) -> None:
    names = composition.method_names
    if getattr(job_config.optimizer, "early_step_in_backward", False):
        raise ConfigError(
            "optimizer.early_step_in_backward = True: slimtrain does not build torchtitan's per-parameter "
            f"optimizers; add \"{PER_LAYER}\" to [slimtrain] methods for updates in backward"
        )
    if PER_LAYER in names:
        from slimtrain.plugins.per_layer_updates import check_rules_declare_state, check_trainer

        check_trainer(max_norm=float(job_config.training.max_norm), grad_accumulation_steps=grad_accumulation_steps(job_config))
        check_rules_declare_state(composition)
    if STATE_8BIT in names:
        from slimtrain.plugins.state_8bit import check_declares_moments

        check_declares_moments(composition)


def build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager=None):
    """slimtrain.titan_integration.optimizer.build_optimizers, then the memory layers on each optimizer."""
    from slimtrain.titan_integration import context, optimizer

    comp = context.current().composition
    container = optimizer.build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    names = comp.method_names
    container.per_layer_steppers = []
    for opt in container.optimizers:
        if STATE_8BIT in names:
            from slimtrain.plugins.state_8bit import install_codec

            install_codec(opt, comp.method(STATE_8BIT).codec())
        if PER_LAYER in names:
            container.per_layer_steppers.append(comp.method(PER_LAYER).attach(opt))
    return container
