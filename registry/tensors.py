"""Reading and writing parameters that may be FSDP2-sharded DTensors.

Periodic methods (refactorization, merges) compute new factors from the whole matrix and must
write them into the sharded originals in place, identically on every rank: assigning through
``right_inverse`` fails on DTensors, and replacing a parameter object would leave torchtitan's
cached checkpoint state dict stale.
"""

from __future__ import annotations

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole (unsharded) value of ``t`` as a plain tensor; all-gathers a DTensor."""
    if is_dtensor(t):
        return t.full_tensor()
    return t.detach()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself when not a DTensor)."""
    if is_dtensor(t):
        return t.to_local()
    return t


@torch.no_grad()
def write_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole-matrix ``value`` (identical on every rank) into ``param`` in place."""
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        sharded = distribute_tensor(
            value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements,
            src_data_rank=None,
        )
        param.to_local().copy_(sharded.to_local())
    else:
        param.copy_(value.to(dtype=param.dtype))
