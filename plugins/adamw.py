"""Full-rank AdamW: the baseline, and the optimizer used when a recipe names no optimizer method.

It honours every param group's own options (other methods may set ``lr`` or ``weight_decay`` per
group); unknown group keys are carried along untouched, as torch optimizers do.
"""

from __future__ import annotations

import dataclasses

import torch

from registry import Capability, Method, OptimizerHyper, ParamSpec, hookimpl


@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """AdamW takes its hyperparameters from the trainer's [optimizer] section."""


class AdamW(Method):
    name = "adamw"
    summary = "full-rank AdamW on every trainable parameter (the baseline)"
    Config = AdamWConfig
    provides = frozenset({Capability.OPTIMIZER})

    def target_patterns(self) -> tuple[str, ...]:
        return ("*",)

    def target_roles(self) -> tuple[str, ...]:
        return ("*",)

    def build_optimizer(self, param_groups: list[dict], hyper: OptimizerHyper) -> torch.optim.Optimizer:
        kwargs = dict(lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=hyper.weight_decay)
        if hyper.implementation == "fused":
            kwargs["fused"] = True
        elif hyper.implementation == "foreach":
            kwargs["foreach"] = True
        else:
            kwargs["foreach"] = False
        return torch.optim.AdamW(param_groups, **kwargs)

    def state_elements(self, spec: ParamSpec) -> int:
        return 2 * spec.numel if spec.trainable else 0


@hookimpl
def register_methods(register):
    register(AdamW)
