"""Shared machinery for methods that reparametrize Linear weights with torch.nn.utils.parametrize.

A method returns a ``LinearParametrization`` for each targeted Linear; ``attach`` registers it on
``weight`` (originals named ``original0..k`` in the order of ``roles``) and, when the
parametrization can compute the layer without materializing W (``x A^T B^T`` for low-rank), routes
the Linear's forward through ``linear_forward``. ``linear.weight`` still returns the dense W, so
anything that reads the weight (exports, norms) keeps working.

Why parametrize rather than swapping in a custom Linear class: parameter names stay under the
original module, so torchtitan's FSDP2 wrapping, per-block compile and checkpoints need no changes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

_capture = threading.local()


@contextlib.contextmanager
def capture_init() -> Iterator[None]:
    """While active, parametrizations with a dense base return that base tensor itself from
    ``forward``, so the model's own ``init_weights`` writes into it (instead of into a temporary
    that parametrize would throw away). Used to give LoRA's W0 the model's own initialization."""
    previous = getattr(_capture, "active", False)
    _capture.active = True
    try:
        yield
    finally:
        _capture.active = previous


def capturing_init() -> bool:
    return getattr(_capture, "active", False)


class LinearParametrization(nn.Module):
    """Base class: a parametrization of an ``out x in`` Linear weight by the originals in ``roles``.

    Subclasses implement ``forward(*originals) -> W``, ``right_inverse(W) -> tuple`` (also called
    on the meta device: return correctly shaped tensors there), ``initialize(originals, fqn)`` and
    optionally ``linear_forward``.
    """

    roles: ClassVar[tuple[str, ...]] = ()
    frozen_roles: ClassVar[frozenset[str]] = frozenset()  # originals that do not train (LoRA's W0)
    #: tensor parallelism: role -> (the original's dimension that follows W's OUTPUT dimension, the
    #: one that follows W's INPUT dimension), None where none does. A column-wise plan shards W's
    #: rows, so each original is sharded on its first entry (replicated where None); a row-wise plan
    #: shards W's columns: the second entry. E.g. low-rank ``B`` (m x r): (0, None), ``A`` (r x n):
    #: (None, 1). Empty: the parametrization cannot follow a TP plan (its Method keeps
    #: ``tensor_parallel = False``). The forward must then compute with DTensor originals.
    tp_dims: ClassVar[dict[str, tuple[int | None, int | None]]] = {}

    def __init__(self, method: str, out_features: int, in_features: int) -> None:
        super().__init__()
        self.method = method
        self.out_features = out_features
        self.in_features = in_features

    def initialize(self, originals: dict[str, torch.Tensor], fqn: str) -> None:
        """Initialize originals in place after the model's own init (they may be DTensors)."""
        raise NotImplementedError

    def linear_forward(self, x: torch.Tensor, originals: list[torch.Tensor], bias: torch.Tensor | None):
        """The layer's output; the default materializes W. Override when factors are cheaper."""
        return nn.functional.linear(x, self(*originals), bias)


class FactorizedParametrization(LinearParametrization):
    """A parametrization whose weight contains ``scale * B @ A`` (roles include "B" and "A")."""

    scale: float = 1.0


def _parametrized_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    plist = self.parametrizations["weight"]
    p: LinearParametrization = plist[0]
    originals = [getattr(plist, f"original{i}") for i in range(len(p.roles))]
    return p.linear_forward(x, originals, self.bias)


def attach(linear: nn.Linear, p: LinearParametrization) -> None:
    """Register ``p`` on ``linear.weight`` and route the layer's forward through it."""
    if parametrize.is_parametrized(linear, "weight"):
        owner = parametrization_of(linear)
        raise ValueError(
            f"weight already parametrized by {getattr(owner, 'method', type(owner).__name__)!r}; "
            f"one parametrization per weight"
        )
    parametrize.register_parametrization(linear, "weight", p, unsafe=True)
    plist = linear.parametrizations["weight"]
    for i, role in enumerate(p.roles):
        original = getattr(plist, f"original{i}")
        if role in p.frozen_roles:
            original.requires_grad_(False)
    _share_class(linear)
    type(linear).forward = _parametrized_linear_forward


# register_parametrization gives every module its own new subclass (``ParametrizedLinear``, made
# anew per call). torch.compile guards on the type of each submodule, so with per-module classes
# every transformer block fails the guard of the one compiled before it and is compiled again: one
# recompilation per block (measured: docs/gpu-path.md), past torch's recompile limit (8) at 1b
# (24 blocks), where torchtitan's fullgraph=True compile then stops the run. All slimtrain-
# parametrized Linears of one base class therefore share one class: the class parametrize adds
# holds only generic members (the ``weight`` property reading ``self.parametrizations``, and the
# forward set above), so sharing it changes no behaviour.
_SHARED_CLASSES: dict[type, type] = {}


def _share_class(linear: nn.Module) -> None:
    own = type(linear)
    base = own.__bases__[0]
    shared = _SHARED_CLASSES.setdefault(base, own)
    if shared is not own:
        linear.__class__ = shared


def bake(linear: nn.Module) -> None:
    """Replace the parametrization of ``linear.weight`` by a plain weight holding the current W
    (for export). Use this rather than ``parametrize.remove_parametrizations`` directly: that
    deletes the ``weight`` property from the module's class, which other Linears share."""
    shared = type(linear)
    members = {k: shared.__dict__[k] for k in ("__getstate__", "__deepcopy__", "weight", "forward") if k in shared.__dict__}
    linear.__class__ = type(shared.__name__, (shared.__bases__[0],), members)
    parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)


def parametrization_of(linear: nn.Module) -> LinearParametrization | None:
    if not parametrize.is_parametrized(linear, "weight"):
        return None
    p = linear.parametrizations["weight"][0]
    return p if isinstance(p, LinearParametrization) else None


def originals(linear: nn.Module) -> dict[str, torch.Tensor]:
    """Role -> original parameter of a parametrized Linear."""
    p = parametrization_of(linear)
    if p is None:
        return {}
    plist = linear.parametrizations["weight"]
    return {role: getattr(plist, f"original{i}") for i, role in enumerate(p.roles)}


# Segments that wrappers (activation checkpointing, torch.compile, FSDP1) insert into module names.
_WRAPPER_SEGMENTS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


def canonical_name(name: str) -> str:
    """``name`` without wrapper segments, so seeds and patterns do not depend on whether
    activation checkpointing or compile is on."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def iter_parametrized(model: nn.Module, method: str | None = None) -> Iterator[tuple[str, nn.Module, Any]]:
    """(canonical fqn, linear, parametrization) for every slimtrain-parametrized Linear,
    optionally of one method."""
    for fqn, module in model.named_modules():
        p = parametrization_of(module)
        if p is not None and (method is None or p.method == method):
            yield canonical_name(fqn), module, p


def role_of(param_name: str, module: nn.Module) -> str:
    """The role of a parameter given its local name inside its owning Linear."""
    p = parametrization_of(module)
    if p is not None and param_name.startswith("parametrizations.weight.original"):
        return p.roles[int(param_name.rsplit("original", 1)[1])]
    return param_name.rsplit(".", 1)[-1]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. a config seed and a weight's fqn) that is the
    same in every process, rank and resume (unlike ``hash``, which is salted per process)."""
    import hashlib

    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded with ``stable_seed(*parts)``: draw whole (unsharded) tensors with it
    on the CPU and write them with ``slimtrain.registry.tensors.write_full_`` to get the same values on any
    number of ranks."""
    g = torch.Generator(device="cpu")
    g.manual_seed(stable_seed(*parts))
    return g
