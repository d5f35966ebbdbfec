"""Checkpointed random-number-generator state, one entry per rank.

Why: torchtitan 0.2.2 checkpoints model, optimizer, LR scheduler, dataloader and step, but not the
RNG. Methods that draw random numbers during training (ReLoRA re-initializing its factors at a
restart and pruning optimizer state at random, randomized range finders for projections) would
then draw different numbers after a resume than in an uninterrupted run, and the losses would
diverge. Saving each rank's CPU generator (and the accelerator's, where there is one) makes a
resumed run bitwise identical to an uninterrupted one on CPU.

Each rank saves under its own key (``rank{r}``), as torchtitan's dataloader does, so DCP stores
every rank's state. ``present_in_checkpoint`` lets the trainer skip restoring it when the
checkpoint was written by a different number of ranks (a resharded resume cannot be bitwise
anyway) instead of failing the load.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

STATE_KEY = "slimtrain_rng"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RNGState(Stateful):
    def __init__(self, device_type: str) -> None:
        self.device_type = device_type

    def _key(self) -> str:
        return f"rank{_rank()}"

    def _device_module(self):
        if self.device_type in ("cpu", "meta"):
            return None
        return getattr(torch, self.device_type, None)

    def state_dict(self) -> dict[str, Any]:
        entry = {"cpu": torch.get_rng_state()}
        mod = self._device_module()
        if mod is not None and hasattr(mod, "get_rng_state"):
            entry["device"] = mod.get_rng_state()
        return {self._key(): entry}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        entry = state_dict.get(self._key())
        if entry is None:
            return
        torch.set_rng_state(entry["cpu"].to("cpu", torch.uint8))
        mod = self._device_module()
        if "device" in entry and mod is not None and hasattr(mod, "set_rng_state"):
            mod.set_rng_state(entry["device"].to("cpu", torch.uint8))

    def present_in_checkpoint(self, checkpoint_id: str) -> bool:
        """Whether the checkpoint folder holds this rank's RNG entry."""
        if not os.path.isdir(checkpoint_id):
            return False
        from torch.distributed.checkpoint import FileSystemReader

        try:
            keys = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata.keys()
        except Exception:
            return False
        prefix = f"{STATE_KEY}.{self._key()}."
        return any(k.startswith(prefix) for k in keys)
