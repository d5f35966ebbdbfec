"""A measured memory breakdown (parameters, gradients, optimizer state, peak), logged once.

Why measured and per rank: the point of these methods is memory, and the analytic estimate
(``slimtrain.registry.memory``) says what a method should cost; this says what the run actually holds on
this rank after the first optimizer step (sharded sizes under FSDP2: local shards only), next to
the device's peak (CUDA allocator peak on GPU, process peak RSS on CPU) and the analytic figure
for the whole model, so a discrepancy is visible in the log of every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@dataclasses.dataclass
class MemoryBreakdown:
    trainable_param_bytes: int
    frozen_param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    peak_bytes: int
    peak_label: str

    def lines(self) -> list[str]:
        gib = 1024**3

        def fmt(n: int) -> str:
            return f"{n / gib:.3f} GiB" if n >= 0.01 * gib else f"{n / 1024**2:.2f} MiB"

        return [
            f"parameters: {fmt(self.trainable_param_bytes + self.frozen_param_bytes)} "
            f"(trainable {fmt(self.trainable_param_bytes)}, frozen {fmt(self.frozen_param_bytes)})",
            f"buffers: {fmt(self.buffer_bytes)}",
            f"gradients: {fmt(self.grad_bytes)}",
            f"optimizer state: {fmt(self.optimizer_state_bytes)}",
            f"peak ({self.peak_label}): {fmt(self.peak_bytes) if self.peak_bytes >= 0 else 'n/a'}",
        ]


def measure(model_parts, optimizers, peak_bytes: int, peak_label: str) -> MemoryBreakdown:
    trainable = frozen = buffers = grads = 0
    seen: set[int] = set()
    for model in model_parts:
        for p in model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += _nbytes(p)
            else:
                frozen += _nbytes(p)
            if p.grad is not None:
                grads += _nbytes(p.grad)
        buffers += sum(_nbytes(b) for b in model.buffers())
    state = 0
    for opt in optimizers:
        for s in opt.state.values():
            state += sum(_nbytes(t) for t in _tensors(s))
    return MemoryBreakdown(trainable, frozen, buffers, grads, state, peak_bytes, peak_label)
