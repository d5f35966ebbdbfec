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

Gradient accumulation (k micro-batches per step): the hook lets the first k - 1 backward passes
accumulate into the parameter's gradient as without per-layer updates (autograd, or FSDP2 adding the
reduced shard), and steps the parameter at its k-th hook, i.e. after the LAST micro-batch of the step,
so the step equals the plain accumulated step. What is kept between micro-batches is the rule's
choice (``UpdateRule.accumulation_specs``): by default the parameter's gradient (alive for every such
parameter between micro-batches); a rule that declares its own buffers (a projected rule: r x n
``P^T G``) has each micro-batch's gradient folded into them at its hook
(``ComposedOptimizer.accumulate_params``) and freed there, so only the buffers stay (the memory
models count either). The update itself, its decoded state and workspace stay one parameter at a
time. With ``clip = "per_parameter"`` and such buffers the accumulated gradient is never formed: each
micro-batch's gradient is clipped to ``max_norm / k`` (which bounds the sum by ``max_norm``). A
parameter whose k-th hook never came (unused in a micro-batch) is stepped by the trainer's
``optimizer.step()``, which steps whatever still has a gradient or buffers (a zero gradient stands in
for a missing last one); the counts restart after every step (and so after a resume).

It declares ``Capability.STEPPER`` (it decides when the composed optimizer steps) with
``steps_in_backward``; the trainer calls ``attach_stepper`` on every built optimizer.

What it cannot honour, refused before training (``check_trainer``), naming the method, the key and
the value: global-norm gradient clipping (``training.max_norm > 0``): the global norm needs every
gradient at once. Use ``training.max_norm = 0`` (no clipping) and, if wanted, ``[per_layer_updates]
clip = "per_parameter"`` with ``max_norm``: each parameter's gradient clipped to that norm on its own.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from slimtrain.registry import Capability, ConfigError, Method, TrainerSettings, hookimpl

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


class PerLayerStepper:
    """The installed hooks of one composed optimizer (``remove()`` takes them off)."""

    def __init__(
        self, optimizer, clip: str = "none", max_norm: float = 1.0, *, accumulation_steps: int = 1, track: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.accumulation_steps = int(accumulation_steps)
        self._seen: dict[int, int] = {}  # id(param) -> backward passes that reached it this step
        self.track = track  # count live gradients at each hook (tests; O(parameters) per hook)
        self.clip = clip
        self.max_norm = float(max_norm)
        self.handles = []
        self.live_grads_seen = 0  # the most gradients alive at one hook call (tests read it)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        for p in self._params:
            self.handles.append(p.register_post_accumulate_grad_hook(self._hook))
        self.handles.append(optimizer.register_step_pre_hook(self._before_step))
        self.handles.append(optimizer.register_step_post_hook(lambda *_: self._seen.clear()))

    def _before_step(self, *_) -> None:
        """Buffers filled but never stepped (a parameter whose last hook did not come): the step
        takes them with a zero gradient in place of the missing last one."""
        pending = getattr(self.optimizer, "pending", None)
        for p in pending() if pending is not None else ():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        seen = self._seen.get(id(p), 0) + 1
        if self.accumulation_steps > 1 and self.optimizer.accumulates(p):
            # the rule's own buffers: fold this micro-batch in and free its gradient
            if self.clip == "per_parameter":
                torch.nn.utils.clip_grad_norm_([p], self.max_norm / self.accumulation_steps)
            self.optimizer.accumulate_params([p])
            if seen < self.accumulation_steps:
                self._seen[id(p)] = seen
                p.grad = None
                return
            self._seen[id(p)] = 0
            if self.track:
                self.live_grads_seen = max(self.live_grads_seen, sum(q.grad is not None for q in self._params))
            self.optimizer.step_params([p])
            p.grad = None
            return
        if seen < self.accumulation_steps:
            self._seen[id(p)] = seen  # keep accumulating: the step comes after the last micro-batch
            return
        self._seen[id(p)] = 0
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
    """A memory layer: ``PerLayerStepper`` decides when each parameter steps (in backward)."""

    name = NAME
    Config = PerLayerUpdatesConfig
    provides = frozenset({Capability.STEPPER})
    steps_in_backward = True
    summary = "each parameter updated in backward as its gradient is ready, gradient freed (no gradient memory)"

    def check_trainer(self, settings: TrainerSettings) -> None:
        if settings.clips:
            raise ConfigError(
                f"[{NAME}] training.max_norm = {settings.max_norm!r}: global-norm clipping needs every gradient "
                f"at once, which per-layer updates free as they go; set training.max_norm = 0 (no clipping) "
                f"and, for clipping, [{NAME}] clip = \"per_parameter\" with max_norm = <bound per parameter>"
            )

    def attach_stepper(self, optimizer, settings: TrainerSettings) -> PerLayerStepper:
        return PerLayerStepper(
            optimizer, self.config.clip, self.config.max_norm, accumulation_steps=settings.grad_accumulation_steps,
        )

    def attach(self, optimizer) -> PerLayerStepper:
        """``attach_stepper`` without accumulation (kept for scripts and tests)."""
        return self.attach_stepper(optimizer, TrainerSettings())


@hookimpl
def register_methods(register):
    register(PerLayerUpdates)
