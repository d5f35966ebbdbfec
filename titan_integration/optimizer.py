"""Optimizer and LR-scheduler builders for the slimtrain train spec.

Why not torchtitan's ``build_optimizers``: it puts every parameter in ONE param group and knows
only Adam/AdamW. Here the composition builds ONE ``ComposedOptimizer`` per model part (each
parameter stepped by its method's update rule, the rest by the default AdamW rule), wrapped in an
``OptimizersContainer`` subclass that still calls ``_post_init`` so torchtitan's step hooks, LR
schedulers and checkpointing (flattened optimizer state dict) work unchanged.

The true step number has ONE owner: the composed optimizer's ``global_step`` (completed steps, kept
in its param groups, so torchtitan's checkpoint restores it). Rules read it through ``StepInfo``;
the container's post-step hook hands it to the composition's step hooks; nothing else counts.

LR re-warms (ReLoRA restarts, momentum reset) multiply torchtitan's own schedule:
``lr(s) = base_lr * schedule(s - 1) * composition.lr_factor(s)``.
"""

from __future__ import annotations

import logging
from typing import Any

from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

import torch.nn as nn  # noqa: E402
from slimtrain.registry import OptimizerHyper, StepContext  # noqa: E402
from torchtitan.components.lr_scheduler import (  # noqa: E402
    LRSchedulersContainer,
    build_lr_schedulers as titan_build_lr_schedulers,
)
from torchtitan.components.optimizer import OptimizersContainer  # noqa: E402

from slimtrain.titan_integration import context  # noqa: E402

log = logging.getLogger("slimtrain")


class SlimtrainOptimizersContainer(OptimizersContainer):
    """One composition-built optimizer per model part; runs the composition's step hooks."""

    def __init__(self, model_parts: list[nn.Module], composition, hyper: OptimizerHyper) -> None:
        self.model_parts = model_parts
        self.composition = composition
        self.hyper = hyper
        self.optimizers = []
        all_params: list[nn.Parameter] = []
        for model in model_parts:
            groups = composition.param_groups(model)
            if not groups:
                raise ValueError("the composition left no trainable parameters")
            self.optimizers.append(composition.build_optimizer(groups, hyper))
            all_params.extend(p for g in groups for p in g["params"])
        self._validate_length(len(model_parts))
        defaults = {"lr": hyper.lr, "betas": hyper.betas, "eps": hyper.eps, "weight_decay": hyper.weight_decay}
        self._post_init(all_params, defaults)
        self.register_step_post_hook(_run_step_hooks)

    @property
    def global_step(self) -> int:
        """Completed optimizer steps, from the one owner (the first part's composed optimizer)."""
        return self.optimizers[0].global_step

    def current_step(self) -> int:
        """The 1-based number of the next optimizer step."""
        return self.global_step + 1

    def describe(self) -> str:
        lines = []
        for i, opt in enumerate(self.optimizers):
            lines.append(f"part {i}: {type(opt).__name__}, {len(opt.param_groups)} param groups ({opt.describe()})")
        return "\n".join(lines)


def _run_step_hooks(container: SlimtrainOptimizersContainer, args: Any, kwargs: Any) -> None:
    step = container.global_step  # the step just taken
    container.composition.after_step(
        StepContext(step=step, model_parts=list(container.model_parts), optimizers=list(container.optimizers))
    )


def build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager=None) -> SlimtrainOptimizersContainer:
    """torchtitan ``build_optimizers_fn``: param groups and optimizer from the composition."""
    comp = context.current().composition
    if optimizer_config.early_step_in_backward:
        raise ValueError(
            "optimizer.early_step_in_backward is not supported by slimtrain: it builds one optimizer "
            "per parameter, which cannot serve methods that schedule across parameters"
        )
    if ft_manager is not None and getattr(ft_manager, "enabled", False):
        raise ValueError("torchft fault tolerance is not supported by slimtrain's optimizer container")
    if optimizer_config.name not in ("AdamW",):
        log.warning(
            "optimizer.name = %r is ignored: the composition's optimizer method %r builds the optimizer",
            optimizer_config.name, comp.optimizer_method.name,
        )
    if optimizer_config.implementation not in ("fused", "foreach", "for-loop"):
        raise ValueError(f"optimizer.implementation = {optimizer_config.implementation!r}")
    hyper = OptimizerHyper(
        lr=optimizer_config.lr,
        betas=(optimizer_config.beta1, optimizer_config.beta2),
        eps=optimizer_config.eps,
        weight_decay=optimizer_config.weight_decay,
        implementation=optimizer_config.implementation,
    )
    container = SlimtrainOptimizersContainer(model_parts, comp, hyper)
    log.info("slimtrain optimizer: %s", container.describe())
    return container


def build_lr_schedulers(optimizers, lr_scheduler_config, training_steps: int) -> LRSchedulersContainer:
    """torchtitan's warmup/stable/decay schedule times the composition's LR factor."""
    comp = context.current().composition
    container = titan_build_lr_schedulers(optimizers, lr_scheduler_config, training_steps)
    for scheduler in container.schedulers:
        base = scheduler.lr_lambdas[0]

        # a plain function (not a callable object): LambdaLR.state_dict then stores nothing for it,
        # so the composition never ends up in a checkpoint
        def combined(k: int, _base=base) -> float:
            return _base(k) * comp.lr_factor(k + 1)

        scheduler.lr_lambdas = [combined for _ in scheduler.optimizer.param_groups]
        # LambdaLR already set the step-1 LR from the plain schedule; recompute it with the factor
        for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * fn(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return container
