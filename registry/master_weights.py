"""The master-weights contract: how a memory layer stores the trainable parameters between steps.

A ``Capability.MASTER_WEIGHTS`` method returns a ``MasterWeights`` from ``Method.master_weights``.
It owns three things, and the rest of slimtrain reads them through this class alone:

* ``storage_dtype``: the dtype every floating-point parameter of the model is stored in. The trainer
  sets it where the model's parameters get their storage dtype, before the model is materialized
  and sharded (``store_parameters``: the torchtitan converter on the meta device; ``slimtrain.prepare``
  after the initialization), so FSDP2 shards, all-gathers and checkpoints the stored dtype and the
  gradients arrive in it. Parameters that are not floating point are refused there, naming the method,
  the parameter and its dtype.
* per trainable parameter, state of its own in ``optimizer.state[param]`` (``stored_keys``; plain
  tensors or DTensors placed like the parameter, so checkpoints save and reshard them and a resume is
  bitwise), created by ``init_state`` when the layer is installed on a ``ComposedOptimizer``;
* for each optimizer step: ``restore`` returns the ``master_dtype`` weight (of the local shard) from
  the stored parameter and that state; the rule updates it (with the gradient cast to ``master_dtype``,
  and state declared without a dtype kept in ``master_dtype``); ``store`` splits the result back into
  the stored parameter and the state. The composed optimizer steps each parameter on its own, so one
  parameter's master copy exists at a time.

The memory models count ``stored_bytes`` (the layer's state per trainable parameter, beyond the
stored weight: optimizer state) and ``coding_bytes`` (what restoring, stepping and storing one
parameter holds at once besides its optimizer state).

A method whose step hook writes parameters outside the optimizer step (``HookStage.WEIGHTS``:
merges, refactorizations) would leave a stored weight whose state no longer matches it: the
composition refuses the pair.
"""

from __future__ import annotations

from typing import Any

import torch

from slimtrain.registry.errors import ConfigError
from slimtrain.registry.method import ParamSpec

__all__ = ["MasterWeights", "check_parameters", "store_parameters"]


class MasterWeights:
    """Identity layer (parameters stored as they are); a MASTER_WEIGHTS method returns a subclass."""

    storage_dtype: torch.dtype = torch.float32
    master_dtype: torch.dtype = torch.float32

    def stored_keys(self) -> tuple[str, ...]:
        """Keys of the layer's own state in ``optimizer.state[param]`` (disjoint from every rule's)."""
        return ()

    def init_state(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Create the layer's state for ``param`` (stored in ``storage_dtype``) in ``state``."""

    def restore(self, local_param: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``master_dtype`` weight of this local shard (a new tensor)."""
        return local_param.to(self.master_dtype, copy=True)

    def store(self, local_param: torch.Tensor, master: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Write ``master`` (local shard, ``master_dtype``) back: the stored weight in place, the state."""
        local_param.copy_(master)

    def stored_bytes(self, spec: ParamSpec) -> int:
        """Bytes of the layer's state for one trainable parameter (beyond its stored weight)."""
        return 0

    def coding_bytes(self, spec: ParamSpec) -> int:
        """Transient bytes of one parameter's step: the master copy, the cast gradient and what
        restoring and storing hold at once."""
        return 0


def check_parameters(model: Any, master: MasterWeights, method: str) -> None:
    """Refuse a parameter that is not floating point (ConfigError naming ``method``, the parameter
    and its dtype), before anything changes."""
    bad = [(n, p.dtype) for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        name, dtype = bad[0]
        raise ConfigError(
            f"[{method}] parameter {name} has dtype = {dtype}: {method} stores parameters as "
            f"{master.storage_dtype} plus a correction and needs floating-point parameters "
            f"({len(bad)} not floating point); drop {method} from methods or make them buffers"
        )


def store_parameters(model: Any, master: MasterWeights, method: str) -> int:
    """Give every floating-point parameter of ``model`` the layer's ``storage_dtype`` (in place; on the
    meta device before sharding, or a materialized model: values rounded), after ``check_parameters``.
    Returns how many parameters changed dtype."""
    check_parameters(model, master, method)
    changed = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dtype != master.storage_dtype:
                p.data = p.data.to(master.storage_dtype)
                changed += 1
    return changed
