"""ReLoRA restarts: every ``every`` steps merge the factors into the frozen base and restart them.

For every parametrization with a frozen base (role "W0", e.g. ``lora``): W0 += scale B A (computed
in fp32 from the whole tensors), A re-initialized kaiming-uniform (a = sqrt 5) from a generator
seeded by ``seed``, the weight's name and the step, B zeroed; all in place into the (possibly sharded)
originals, identically on every rank. The layer's function is unchanged by a merge.

ReLoRA = ``lora`` + ``lora_merge`` + ``momentum_reset`` (the optimizer state of B and A no longer
matches the restarted factors; momentum_reset also re-warms the LR). This method touches weights only.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from slimtrain.registry import Capability, HookStage, Method, Requirement, StepContext, check_range, hookimpl
from slimtrain.registry.parametrization import iter_parametrized, originals, seeded_generator
from slimtrain.registry.tensors import full_tensor, write_full_

NAME = "lora_merge"


@torch.no_grad()
def merge_(model: nn.Module, *, seed: int = 0, step: int = 0) -> int:
    """Merge and restart every frozen-base factorized weight of ``model``; returns how many."""
    merged = 0
    for fqn, linear, p in iter_parametrized(model):
        orig = originals(linear)
        if not {"W0", "B", "A"} <= set(orig):
            continue
        w0, b, a = orig["W0"], orig["B"], orig["A"]
        scale = float(getattr(p, "scale", 1.0))
        work = torch.promote_types(w0.dtype, torch.float32)  # fp32 (fp64 inputs stay fp64)
        bf, af = full_tensor(b).to(work), full_tensor(a).to(work)
        new_w0 = torch.addmm(full_tensor(w0).to(work), bf, af, alpha=scale)
        write_full_(w0, new_w0)
        g = seeded_generator(NAME, seed, fqn, step)
        write_full_(a, nn.init.kaiming_uniform_(torch.empty(tuple(a.shape)), a=math.sqrt(5), generator=g))
        b.zero_()
        merged += 1
    return merged


@dataclasses.dataclass(frozen=True)
class LoRAMergeConfig:
    every: int = 2000  # steps between restarts (ReLoRA advises 3-10 restarts per run)
    seed: int = 0  # re-initialization of A after each merge

    def __post_init__(self) -> None:
        check_range(NAME, "every", self.every, low=1)


class LoRAMerge(Method):
    name = NAME
    summary = "every N steps merge (alpha/r) B A into the frozen base, re-init A, zero B (ReLoRA restarts)"
    Config = LoRAMergeConfig
    provides = frozenset({Capability.STEP_HOOK})
    requires = (Requirement(Capability.FROZEN_BASE, "a parametrization with a frozen base W0"),)
    hook_stage = HookStage.WEIGHTS

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step % self.config.every != 0:
            return
        for part in ctx.model_parts:
            merge_(part, seed=self.config.seed, step=ctx.step)


@hookimpl
def register_methods(register):
    register(LoRAMerge)
