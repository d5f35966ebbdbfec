"""Momentum reset: every ``every`` steps zero the Adam moments of chosen parameters, then re-warm the LR.

After optimizer step s with ``s % every == 0`` the chosen parameters' optimizer state is reset as each
update rule DECLARED it (``StateSpec.on_reset``: moments zeroed, projections kept, Fira's limiter
re-initialized) through ``ComposedOptimizer.reset_state``; this method knows no rule and no state key.
With ``reset_step`` the per-parameter step counts (declared ``counter=True``) restart too, so
Adam's bias correction restarts as when the benchmark paper's code re-creates the optimizer (under
GaLore/Fira this also makes the next step refresh the projection). Then, with ``warmup_steps = K > 0``,
the LR factor rises linearly over steps s+1 .. s+K from ``warmup_start`` to 1.0:
``factor(s + k) = warmup_start + (1 - warmup_start) (k - 1) / K`` for k = 1..K, 1.0 afterwards.

``lr_factor(step)`` takes the 1-based number of the optimizer step the LR is used for and depends on
the step number alone, so it survives checkpoints. Which parameters: every trainable one by default
(``targets = ("*",)``, ``roles = ("*",)``), or module-name patterns and parameter roles (``"weight"``,
``"bias"``, ``"A"``, ``"B"``, ...). Composes with any method: with ``sltrain`` + ``refactorization``
it gives the benchmark paper's "restarts", with ``lora`` + ``lora_merge`` ReLoRA. It runs at
``HookStage.OPTIMIZER_STATE``, after weight-rewriting hooks of the same step.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable

import torch

from slimtrain.registry import Capability, ConfigError, HookStage, Method, ParamSpec, StepContext, check_range, hookimpl
from slimtrain.registry.targets import matches_any

@dataclasses.dataclass(frozen=True)
class MomentumResetConfig:
    every: int = 1000
    reset_step: bool = True
    warmup_steps: int = 10
    warmup_start: float = 0.001
    targets: tuple[str, ...] = ("*",)
    roles: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        check_range("momentum_reset", "every", self.every, low=1)
        check_range("momentum_reset", "warmup_steps", self.warmup_steps, low=0)
        check_range("momentum_reset", "warmup_start", self.warmup_start, low=0.0, high=1.0)
        if not self.targets:
            raise ConfigError("[momentum_reset] targets = () is empty; use ('*',) for every parameter")
        if not self.roles:
            raise ConfigError("[momentum_reset] roles = () is empty; use ('*',) for every role")


def iter_optimizers(optimizers: Iterable) -> list[torch.optim.Optimizer]:
    """Flatten torchtitan's OptimizersContainer (``.optimizers``) and plain optimizer lists."""
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "optimizers"):
        optimizers = [optimizers]  # a single optimizer or container rather than a list
    out, seen = [], set()
    for o in optimizers:
        inner = getattr(o, "optimizers", None)
        for opt in (inner if isinstance(inner, (list, tuple)) else [o]):
            if id(opt) not in seen:
                seen.add(id(opt))
                out.append(opt)
    return out


class MomentumReset(Method):
    name = "momentum_reset"
    summary = "every N steps zero the Adam moments (optionally the step count), then re-warm the LR"
    Config = MomentumResetConfig
    provides = frozenset({Capability.STEP_HOOK, Capability.LR_SCHEDULE})
    hook_stage = HookStage.OPTIMIZER_STATE

    def selects(self, spec: ParamSpec) -> bool:
        return (
            spec.trainable
            and matches_any(spec.module, self.config.targets)
            and any(fnmatch.fnmatchcase(spec.role, r) for r in self.config.roles)
        )

    def chosen_params(self, model_parts: Iterable) -> list[torch.Tensor]:
        from slimtrain.registry.composition import model_param_specs

        out = []
        for model in model_parts or ():
            for spec, param in model_param_specs(model):
                if self.selects(spec):
                    out.append(param)
        return out

    def reset(self, params: Iterable[torch.Tensor], optimizers: Iterable) -> int:
        """Reset the declared state of ``params`` in every optimizer; returns how many parameters had
        state reset. Optimizers must be composed ones (they know what each rule declared)."""
        params = list(params)
        done = 0
        for opt in iter_optimizers(optimizers):
            reset_state = getattr(opt, "reset_state", None)
            if reset_state is None:
                raise TypeError(
                    f"[momentum_reset] cannot reset {type(opt).__name__}: only optimizers built by the "
                    f"composition (ComposedOptimizer) declare their state"
                )
            done += reset_state(params, keep_counters=not self.config.reset_step)
        return done

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step % self.config.every == 0:
            self.reset(self.chosen_params(ctx.model_parts), ctx.optimizers)

    def lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps <= 0 or step <= c.every:
            return 1.0
        last_reset = ((step - 1) // c.every) * c.every
        k = step - last_reset  # 1 .. every
        if k > c.warmup_steps:
            return 1.0
        return c.warmup_start + (1.0 - c.warmup_start) * (k - 1) / c.warmup_steps


@hookimpl
def register_methods(register):
    register(MomentumReset)
