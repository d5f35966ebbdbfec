"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") as a slimtrain update rule.

For each selected parameter, with the trainer's betas (b1, b2), LR and weight decay::

    c = b1 m + (1 - b1) g
    W <- W (1 - lr wd) - lr * lr_scale * sign(c)
    m <- b2 m + (1 - b2) g

One state tensor per parameter (``exp_avg``, a moment: momentum_reset zeroes it, 8-bit state may
quantize it). Every parameter Lion does not select goes to the composition's other rules (AdamW by
default), so Lion composes with parametrizations (e.g. SLTrain's B/A factors), momentum_reset and
another optimizer method on disjoint targets. FSDP2: elementwise on each rank's row shard (state
laid out ``rows``); no communication.
"""

from __future__ import annotations

import dataclasses

import torch

from slimtrain import DEFAULT_TARGETS, Capability, ConfigError, Method, ParamSpec, check_range, hookimpl
from slimtrain import OnReset, RuleParam, StateSpec, StepInfo, UpdateRule


@dataclasses.dataclass(frozen=True)
class LionConfig:
    lr_scale: float = 0.3  # Lion's sign update is larger than Adam's: the paper uses a 3-10x smaller LR
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        check_range("lion", "lr_scale", self.lr_scale, low=0, low_inclusive=False)
        if not self.targets:
            raise ConfigError("[lion] targets = () is empty; name at least one module pattern")
        if not self.roles:
            raise ConfigError("[lion] roles = () is empty; name at least one parameter role, e.g. 'weight'")


class LionRule(UpdateRule):
    """The Lion step on a group's parameters (elementwise, so any shape; batched with foreach)."""

    needs_matrix = False

    def __init__(self, method: str, lr_scale: float):
        self.method = method
        self.lr_scale = lr_scale

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        return [StateSpec("exp_avg", spec.shape, None, OnReset.ZERO, moment=True, layout="rows")]

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        b1, b2 = info.betas
        weights = [p.param for p in params]
        grads = [p.grad for p in params]
        moments = [p.state["exp_avg"] for p in params]
        if info.weight_decay != 0:
            torch._foreach_mul_(weights, 1 - info.lr * info.weight_decay)
        direction = torch._foreach_lerp(moments, grads, 1 - b1)  # b1 m + (1 - b1) g
        torch._foreach_sign_(direction)
        torch._foreach_add_(weights, direction, alpha=-info.lr * self.lr_scale)
        torch._foreach_lerp_(moments, grads, 1 - b2)  # b2 m + (1 - b2) g


class Lion(Method):
    name = "lion"
    summary = "Lion: sign of interpolated momentum, one state tensor per selected parameter"
    Config = LionConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def update_rule(self) -> LionRule:
        return LionRule(self.name, self.config.lr_scale)


@hookimpl
def register_methods(register):
    register(Lion)
