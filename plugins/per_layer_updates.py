"""Per-layer updates: each parameter is updated as soon as its gradient is ready in backward, and
its gradient is freed, so the gradients of the whole model never exist at once (gradient memory:
the largest single parameter's gradient instead of all of them).

How: a ``register_post_accumulate_grad_hook`` on every parameter the composed optimizer holds. The
hook steps that one parameter through its own update rule (``ComposedOptimizer.step_params``, part
of step ``global_step + 1``) and sets ``p.grad = None``. Under FSDP2 the hook sits on the sharded
parameter, which FSDP2 calls after the reduce-scatter with the reduced shard as its gradient, so at
1 and 2 ranks every rule sees exactly the gradient ``step()`` would have seen. The trainer's usual
``optimizer.step()`` then finds no gradient left: it only counts the step, and the step hooks
(momentum reset, refactorization) run after it as before. Every rule must work on a list of one
parameter (the update-rule contract); 8-bit state composes (the codec is per parameter).

What it cannot honour, refused before training, naming the method, the key and the value:
* global-norm gradient clipping (``training.max_norm``): the global norm needs every gradient at
  once. Set ``training.max_norm = 0`` (none) and, if wanted, ``[per_layer_updates] clip =
  "per_parameter"`` with ``max_norm``: each parameter's gradient clipped to that norm on its own.
* gradient accumulation (more than one micro-batch per step): the hook would update on every
  micro-batch. Use a larger local batch (with activation checkpointing) instead.
* an optimizer method whose rule declares no state (its per-parameter step is not defined).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from slimtrain.registry import ConfigError, Method, hookimpl

NAME = "per_layer_updates"
CLIPS = ("none", "per_parameter")


@dataclasses.dataclass(frozen=True)
class PerLayerUpdatesConfig:
    clip: str = "none"
    max_norm: float = 1.0  # per-parameter gradient norm bound, with clip = "per_parameter"

    def __post_init__(self) -> None:
        if self.clip not in CLIPS:
            raise ConfigError(f"[{NAME}] clip = {self.clip!r}; allowed: {', '.join(CLIPS)}")
        if not isinstance(self.max_norm, (int, float)) or isinstance(self.max_norm, bool) or not (
            math.isfinite(self.max_norm) and self.max_norm > 0
        ):
            raise ConfigError(f"[{NAME}] max_norm = {self.max_norm!r}; allowed: a finite number > 0")


def check_trainer(*, max_norm: float, grad_accumulation_steps: int) -> None:
    """Refuse trainer settings per-layer updates cannot honour (see the module docstring)."""
    if max_norm and max_norm > 0 and math.isfinite(max_norm):
        raise ConfigError(
            f"[{NAME}] training.max_norm = {max_norm!r}: global-norm clipping needs every gradient at once, "
            f"which per-layer updates free as they go; set training.max_norm = 0 (no global clipping) and, "
            f"for clipping, [{NAME}] clip = \"per_parameter\" with max_norm = <bound per parameter>"
        )
    if grad_accumulation_steps != 1:
        raise ConfigError(
            f"[{NAME}] gradient accumulation steps = {grad_accumulation_steps} (training.global_batch_size / "
            f"local_batch_size / data-parallel ranks): per-layer updates step on every backward; use "
            f"global_batch_size = -1 (one micro-batch per step) and a larger local_batch_size"
        )


def check_rules_declare_state(composition) -> None:
    """Refuse an optimizer method whose rule declares no state."""
    from slimtrain.registry.update_rule import UpdateRule

    for m in composition.optimizer_methods:
        if type(m.update_rule()).state_specs is UpdateRule.state_specs:
            raise ConfigError(
                f"[{NAME}] optimizer method {m.name!r} declares no state (its update rule has no state_specs): "
                f"per-layer updates step rules one parameter at a time through their declared state"
            )


class PerLayerStepper:
    """The installed hooks of one composed optimizer (``remove()`` takes them off)."""

    def __init__(self, optimizer, clip: str = "none", max_norm: float = 1.0, *, track: bool = False) -> None:
        self.optimizer = optimizer
        self.track = track  # count live gradients at each hook (tests; O(parameters) per hook)
        self.clip = clip
        self.max_norm = float(max_norm)
        self.handles = []
        self.live_grads_seen = 0  # the most gradients alive at one hook call (tests read it)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in self._params:
            self.handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if self.track:
            self.live_grads_seen = max(self.live_grads_seen, sum(q.grad is not None for q in self._params))
        if self.clip == "per_parameter":
            torch.nn.utils.clip_grad_norm_([p], self.max_norm)
        self.optimizer.step_params([p])
        p.grad = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class PerLayerUpdates(Method):
    """Marker method: the trainer installs ``PerLayerStepper`` on each composed optimizer."""

    name = NAME
    Config = PerLayerUpdatesConfig
    provides = frozenset()
    summary = "each parameter updated in backward as its gradient is ready, gradient freed (no gradient memory)"

    def attach(self, optimizer) -> PerLayerStepper:
        return PerLayerStepper(optimizer, self.config.clip, self.config.max_norm)


@hookimpl
def register_methods(register):
    register(PerLayerUpdates)
