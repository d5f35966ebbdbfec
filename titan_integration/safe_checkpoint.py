"""Resuming without running code from the checkpoint: restricted unpickling on every load path.

Why: a torchtitan 0.2.2 resume unpickles three things with plain pickle, so a crafted checkpoint
folder executes code the moment a run resumes from it:

1. the DCP metadata file (``.metadata``): ``FileSystemReader.read_metadata`` calls ``pickle.load``
   (torch 2.11-2.13 offer no safe variant; nothing in torch.distributed.checkpoint takes
   ``weights_only``);
2. non-tensor values (step, LR-scheduler and param-group scalars, the dataloader's bytes):
   ``DefaultLoadPlanner.load_bytes`` calls ``torch.load(weights_only=False)``;
3. the dataloader's own state: torchtitan's ``ParallelAwareDataloader`` stores
   ``pickle.dumps(state)`` and restores it with ``pickle.loads``.

``install()`` routes (1) and (3) through ``RestrictedUnpickler``, which resolves only the globals a
checkpoint written by torch and torchtitan contains (DCP's metadata classes, ``torch.Size``, dtypes,
layouts, paths) and refuses anything else with an error naming it, and (2) through torch's
``weights_only=True`` loader (primitives, containers and tensors). Saving is unchanged. The
allowlist was read off real checkpoints of every recipe (tests/integration resume them through
these loaders).

Even so, treat checkpoints like code you run: the tensors themselves are data, but a checkpoint
from someone else decides your weights.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import torch

_ALLOWED_PREFIXES = ("torch.distributed.checkpoint.",)
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked for a global outside the allowlist."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_ALLOWED_PREFIXES):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # a class (dataclass, enum), never a function to call
                return obj
        raise UnsafeCheckpointError(
            f"checkpoint refused: it asks to load {module}.{name}, which a checkpoint written by "
            f"torch/torchtitan does not contain (see titan_integration/safe_checkpoint.py); "
            f"only resume from checkpoints you trust"
        )


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _pickle_with_restricted_loads() -> types.SimpleNamespace:
    """A stand-in for the ``pickle`` module as seen by one library module: the same ``dump(s)``,
    restricted ``load(s)``."""
    return types.SimpleNamespace(
        dump=pickle.dump,
        dumps=pickle.dumps,
        load=lambda file, **kwargs: RestrictedUnpickler(file).load(),
        loads=lambda data, **kwargs: restricted_loads(data),
        HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL,
        DEFAULT_PROTOCOL=pickle.DEFAULT_PROTOCOL,
        UnpicklingError=pickle.UnpicklingError,
        PicklingError=pickle.PicklingError,
    )


def _load_bytes_weights_only(self, read_item, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``weights_only=True`` (same placement logic)."""
    from torch.distributed.checkpoint._traverse import set_element

    obj = torch.load(value, weights_only=True)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


def install() -> None:
    """Route checkpoint loads through the restricted loaders (idempotent)."""
    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    if getattr(dcp_filesystem, "_slimtrain_safe", False):
        return
    dcp_filesystem.pickle = _pickle_with_restricted_loads()
    dcp_filesystem._slimtrain_safe = True
    DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
    try:
        import torchtitan.components.dataloader as titan_dataloader
    except ImportError:  # registry-only use: nothing of torchtitan's to route
        return
    titan_dataloader.pickle = _pickle_with_restricted_loads()
