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

``install()`` routes (1) and (3) through ``RestrictedUnpickler``, which resolves only the exact
(module, name) pairs a checkpoint written by torch and torchtitan contains (``METADATA_GLOBALS``:
DCP's metadata classes, ``torch.Size``, dtypes, ``_get_layout``, ``PosixPath``;
``DATALOADER_GLOBALS``: none) and refuses anything else with an error naming it and the file, and
(2) through torch's ``weights_only=True`` loader (primitives, containers and tensors), whose
refusal is re-raised naming the value. An earlier version allowed every class under
``torch.distributed.checkpoint.*``; dotted names resolved through those modules
(``operator.methodcaller`` reached via ``torch.distributed.checkpoint.filesystem``) ran code. Saving
is unchanged. tests/integration/test_safe_checkpoint.py feeds a corpus of gadget pickles
(tests/integration/gadget_pickles.py) to all three places; test_checkpoint_guard.py checks that a
fresh torchtitan checkpoint references nothing outside the list.

Even so, treat checkpoints like code you run: the tensors themselves are data, but a checkpoint
from someone else decides your weights.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any

import torch

# The exact globals a checkpoint written by torch (2.11-2.13) DCP and torchtitan 0.2.2 references,
# read off real checkpoints of full_rank, sltrain and galore at 1 and 2 ranks, on the embedded corpus
# and on torchtitan's c4_test loader (tests/integration/test_safe_checkpoint.py lists the globals of
# fresh checkpoints and checks that they are all here). Classes only (their constructors and
# ``__setstate__`` store fields; none calls anything given to it) plus ``_get_layout``, which looks
# a layout up by name in a fixed table. No prefix, no module attribute reached through a dotted
# name: ``("torch.distributed.checkpoint.filesystem", "os.system")`` is not in this set.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    }
    | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
)
# torchtitan's dataloader state (``pickle.dumps`` of StatefulDataLoader's state dict, its dataset's
# state inside): only dicts, lists, strings and numbers, no global at all.
DATALOADER_GLOBALS: frozenset[tuple[str, str]] = frozenset()


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked for a global outside the allowlist."""


class DamagedCheckpointError(pickle.UnpicklingError):
    """A checkpoint file cannot be unpickled (truncated, a flipped byte): named, instead of the bare
    EOFError / MemoryError / UnpicklingError pickle raises."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the (module, name) pairs of ``allowed``.

    ``find_class`` is the only way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ
    via those, and the copyreg extension codes all go through it), so refusing there refuses every
    reduce-to-a-callable gadget; persistent ids are refused by ``pickle.Unpickler`` itself."""

    def __init__(self, file, allowed: frozenset[tuple[str, str]] = METADATA_GLOBALS, source: str = "") -> None:
        super().__init__(file)
        self._allowed = allowed
        self._source = source

    def load(self) -> Any:
        try:
            return super().load()
        except UnsafeCheckpointError:
            raise
        except (EOFError, MemoryError, pickle.UnpicklingError, ValueError, TypeError, IndexError,
                KeyError, AttributeError, OverflowError, UnicodeDecodeError) as exc:
            where = self._source or "a checkpoint file"
            raise DamagedCheckpointError(
                f"{where} is damaged or truncated and cannot be read ({type(exc).__name__}: {exc})"[:2000]
            ) from None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        where = f" ({self._source})" if self._source else ""
        raise UnsafeCheckpointError(
            f"checkpoint refused{where}: it asks to load {module}.{name}, which a checkpoint written by "
            f"torch/torchtitan does not contain (allowed: the exact list in "
            f"titan_integration/safe_checkpoint.py); nothing from it was run. Only resume from "
            f"checkpoints you trust"
        )


def restricted_loads(data: bytes, allowed: frozenset[tuple[str, str]] = METADATA_GLOBALS, source: str = "") -> Any:
    return RestrictedUnpickler(io.BytesIO(data), allowed, source).load()


def _load_metadata(file, **kwargs) -> Any:
    """DCP's ``pickle.load(metadata_file)``: restricted, and every storage file it names must lie in
    the checkpoint folder itself (a crafted ``relative_path`` would read any file as tensor data)."""
    source = str(getattr(file, "name", ".metadata"))
    metadata = RestrictedUnpickler(file, METADATA_GLOBALS, source).load()
    storage = getattr(metadata, "storage_data", None) or {}
    for info in storage.values() if isinstance(storage, dict) else ():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise UnsafeCheckpointError(
                f"checkpoint refused ({source}): it names the storage file {rel!r}, outside its folder"
            )
    return metadata


def _pickle_with_restricted_loads(allowed: frozenset[tuple[str, str]], what: str) -> types.SimpleNamespace:
    """A stand-in for the ``pickle`` module as seen by one library module: the same ``dump(s)``,
    restricted ``load(s)`` resolving only ``allowed`` (errors name the file, or ``what``)."""

    def load(file, **kwargs):
        return RestrictedUnpickler(file, allowed, str(getattr(file, "name", what))).load()

    return types.SimpleNamespace(
        dump=pickle.dump,
        dumps=pickle.dumps,
        load=_load_metadata if allowed is METADATA_GLOBALS else load,
        loads=lambda data, **kwargs: restricted_loads(data, allowed, what),
        HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL,
        DEFAULT_PROTOCOL=pickle.DEFAULT_PROTOCOL,
        UnpicklingError=pickle.UnpicklingError,
        PicklingError=pickle.PicklingError,
    )


def _load_bytes_weights_only(self, read_item, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``weights_only=True`` (same placement logic)."""
    from torch.distributed.checkpoint._traverse import set_element

    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights_only refusal: name the value it was in
        raise UnsafeCheckpointError(
            f"checkpoint refused (value {read_item.dest_index.fqn!r}): {exc}".split("\n\nCheck the")[0]
        ) from None
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
    dcp_filesystem.pickle = _pickle_with_restricted_loads(METADATA_GLOBALS, ".metadata")
    dcp_filesystem._slimtrain_safe = True
    DefaultLoadPlanner.load_bytes = _load_bytes_weights_only
    try:
        import torchtitan.components.dataloader as titan_dataloader
    except ImportError:  # registry-only use: nothing of torchtitan's to route
        return
    titan_dataloader.pickle = _pickle_with_restricted_loads(DATALOADER_GLOBALS, "dataloader state")
