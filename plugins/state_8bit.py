"""8-bit optimizer state: every state tensor an update rule declares ``moment=True`` is stored
block-wise quantized (``slimtrain.registry.quant8``) and dequantized to its declared dtype for the update.

It knows no rule and no key name: it reads the rules' declarations (``StateSpec.moment``), so it
composes with adamw, galore, fira and every rule that declares its state. Projections, limiters,
step counts and other non-moment state stay in full precision; so do 1-D moments (norm weights and
biases: a negligible share, and a 1-D "rows" shard under FSDP2 would split blocks across ranks).

Stored per moment ``<name>``: ``<name>_q8`` (uint8 codes, the moment's shape and layout) and
``<name>_absmax`` (fp32, ``shape[:-1] + (n_blocks,)``, row-sharded like it). Moments declared
``non_negative=True`` (second moments) use the unsigned map applied to ``sqrt(v)``: the update reads
``sqrt(v)``, and ``v`` spans twice the orders of magnitude of ``sqrt(v)``, so quantizing ``v`` itself
rounds more small entries to 0, where ``m / (sqrt(v) + eps)`` blows up (``benchmarks/quant8_error.py``
measures both); the others the signed map. Nothing is inferred from key names. A moment whose rows
are so short that codes plus one scale per row cost more than 2 bytes per element (APOLLO-Mini's
m x 1 moments: 5) is not served: it stays in full precision. Plain tensors (DTensors under FSDP2),
so DCP saves and reshards them and a resume is bitwise: the codes and scales are the state.

How it is installed: it declares ``Capability.STATE_CODEC``; the trainer installs ``state_codec()``
on every built ``ComposedOptimizer`` (``ComposedOptimizer.install_codec``), and the memory models read
its ``stored_bytes`` / ``coding_bytes``. Bad input (block_size <= 0, an unknown map) is refused when
the recipe is composed; a rule that declares no state by the composition, before any model.
"""

from __future__ import annotations

import dataclasses

import torch

from slimtrain.registry import Capability, ConfigError, Method, hookimpl
from slimtrain.registry.composed_optimizer import StateCodec
from slimtrain.registry.quant8 import MAPS, dequantize, quantize
from slimtrain.registry.update_rule import StateSpec

NAME = "state_8bit"


@dataclasses.dataclass(frozen=True)
class State8bitConfig:
    block_size: int = 256
    map: str = "dynamic"

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
            raise ConfigError(f"[{NAME}] block_size = {self.block_size!r}; allowed: an integer > 0 (e.g. 256)")
        if self.map not in MAPS:
            raise ConfigError(f"[{NAME}] map = {self.map!r}; allowed: {', '.join(MAPS)}")


def quantized(decl: StateSpec, block_size: int = 256) -> bool:
    """Whether ``state_8bit`` stores this declaration quantized: a 2-D+ moment whose codes and block
    scales cost at most 2 bytes per element (the most compact full precision)."""
    if not (decl.moment and len(decl.shape) >= 2):
        return False
    from slimtrain.registry.quant8 import n_blocks

    last = decl.shape[-1]
    return last + 4 * n_blocks(last, block_size) <= 2 * last


class Quant8Codec(StateCodec):
    """``StateCodec`` that stores 2-D+ moments as uint8 codes plus fp32 block scales."""

    def __init__(self, block_size: int = 256, kind: str = "dynamic") -> None:
        State8bitConfig(block_size, kind)  # same checks, same messages
        self.block_size = block_size
        self.kind = kind

    def serves(self, decl: StateSpec) -> bool:
        return quantized(decl, self.block_size)

    def stored_keys(self, decl: StateSpec) -> tuple[str, ...]:
        if not self.serves(decl):
            return (decl.name,)
        return (f"{decl.name}_q8", f"{decl.name}_absmax")

    def encode(self, decl: StateSpec, value: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if not self.serves(decl):
            state[decl.name] = value
            return
        from slimtrain.registry.tensors import is_dtensor, local_tensor

        local = local_tensor(value)
        unsigned = decl.non_negative  # stored as sqrt(v): the update reads sqrt(v), and its range is half v's
        codes, scales = quantize(local, signed=not unsigned, kind=self.kind, block_size=self.block_size, sqrt=unsigned)
        ckey, skey = self.stored_keys(decl)
        old_c, old_s = state.get(ckey), state.get(skey)
        if old_c is not None and old_s is not None and tuple(local_tensor(old_s).shape) == tuple(scales.shape):
            local_tensor(old_c).copy_(codes)  # in place: keeps DTensor wrappers and checkpoint views
            local_tensor(old_s).copy_(scales)
            return
        if is_dtensor(value):
            codes, scales = _like(value, codes, decl.shape), _like(value, scales, (*decl.shape[:-1], _nb(decl, self)))
        state[ckey], state[skey] = codes, scales

    def decode(self, decl: StateSpec, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if not self.serves(decl):
            return state[decl.name]
        from slimtrain.registry.tensors import is_dtensor, local_tensor

        ckey, skey = self.stored_keys(decl)
        codes = state[ckey]
        unsigned = decl.non_negative
        out = dequantize(
            local_tensor(codes), local_tensor(state[skey]), signed=not unsigned, kind=self.kind,
            block_size=self.block_size, dtype=dtype, square=unsigned,
        )
        if is_dtensor(codes):
            out = _like(codes, out, decl.shape)
        return out


    def fused_step(self, update, decls: list[StateSpec], item, info) -> bool:
        """Step ``item`` through ``update`` (an ``ElementwiseUpdate``) in one compiled decode + update +
        encode (``slimtrain.registry.quant8_fused``), writing the parameter, codes and scales in place;
        False (nothing done) where it does not apply: fusion off or unavailable, a moment this codec
        does not serve, other served state the update does not name, a non-fp32 or non-contiguous
        (local) parameter or gradient, an empty local shard. The caller then steps unfused."""
        from slimtrain.registry import quant8_fused
        from slimtrain.registry.tensors import local_tensor

        if not quant8_fused.fused_available():
            return False
        by_name = {d.name: d for d in decls}
        moments = [by_name.get(n) for n in update.moments]
        if any(d is None or not self.serves(d) for d in moments):
            return False
        if any(self.serves(d) and d.name not in update.moments for d in decls):
            return False
        param, grad = local_tensor(item.param), local_tensor(item.grad)
        if (param.dtype != torch.float32 or grad.dtype != torch.float32 or param.numel() == 0
                or not param.is_contiguous() or tuple(grad.shape) != tuple(param.shape)):
            return False
        key = (update.fn, tuple(d.non_negative for d in moments), update.c_source)
        kernels = self.__dict__.setdefault("_kernels", {})
        kernel = kernels.get(key)
        if kernel is None:
            kernel = kernels[key] = quant8_fused.FusedCodecKernel(update.fn, key[1], self.kind, self.block_size,
                                                                  update.c_source)
        stored = [local_tensor(item.state[k]) for d in moments for k in self.stored_keys(d)]
        scalars = update.scalars_for(item, info)
        if not kernel(param, grad.contiguous(), stored, scalars):
            kernel.step_eager(param, grad.contiguous(), stored, scalars)  # this step only: fusion is now off
        return True

    def stored_bytes(self, decl: StateSpec, bytes_per_element: int) -> int:
        """One uint8 code per element and one fp32 scale per block of each row."""
        rows = decl.numel // decl.shape[-1]
        return decl.numel + 4 * rows * _nb(decl, self)

    def coding_bytes(self, decl: StateSpec, bytes_per_element: int) -> int:
        """What ``slimtrain.registry.quant8`` holds at once encoding or decoding one moment. It works
        ``CHUNK_ELEMENTS`` at a time (whole rows), so beyond the new codes and scales only one chunk's
        temporaries of c elements are alive: the normalized fp32 blocks, their absolute values, the
        uint8 codes, the int64 lower codes and the gathered midpoints (21c), the fp32 copy being
        encoded (``sqrt(v)``, or the fp32 copy of a non-fp32 moment: 4c), rows zero-padded to whole
        blocks (4 bytes per padded element); decoding holds the int64 indices and gathered values (12c)."""
        from slimtrain.registry.quant8 import CHUNK_ELEMENTS, n_blocks

        n, last = decl.numel, decl.shape[-1]
        rows = n // last
        chunk_rows = min(rows, max(1, CHUNK_ELEMENTS // last))
        c = chunk_rows * last
        cp = chunk_rows * n_blocks(last, self.block_size) * self.block_size  # padded to whole blocks
        copy = ENCODE_COPY_BYTES * c if (decl.non_negative or bytes_per_element != 4) else 0
        padded = 4 * cp if cp > c else 0
        scales = 4 * rows * n_blocks(last, self.block_size)
        encode = n + scales + copy + padded + ENCODE_BYTES * cp
        decode = max(DECODE_BYTES * c, 4 * c + padded)
        return max(encode, decode)


#: bytes per element of one chunk ``slimtrain.registry.quant8`` holds while encoding / decoding
ENCODE_BYTES = 21
ENCODE_COPY_BYTES = 4
DECODE_BYTES = 12


def _nb(decl: StateSpec, codec: Quant8Codec) -> int:
    from slimtrain.registry.quant8 import n_blocks

    return n_blocks(decl.shape[-1], codec.block_size)


def _like(ref: torch.Tensor, local: torch.Tensor, global_shape: tuple[int, ...]) -> torch.Tensor:
    """``local`` as a DTensor placed like ``ref`` (Shard(0) rows or replicated)."""
    from torch.distributed.tensor import DTensor

    stride = tuple(int(torch.empty(global_shape, device="meta").stride(i)) for i in range(len(global_shape)))
    return DTensor.from_local(local, ref.device_mesh, ref.placements, shape=torch.Size(global_shape), stride=stride,
                              run_check=False)


def install_codec(optimizer, codec: StateCodec) -> int:
    """``optimizer.install_codec(codec)`` (kept for scripts and tests that build optimizers by hand)."""
    return optimizer.install_codec(codec)


class State8bit(Method):
    """A memory layer: the composed optimizer stores the moments through ``Quant8Codec``."""

    name = NAME
    Config = State8bitConfig
    provides = frozenset({Capability.STATE_CODEC})
    summary = "optimizer moments stored block-wise in 8 bits (uint8 codes + fp32 absmax per block)"

    def state_codec(self) -> Quant8Codec:
        return Quant8Codec(self.config.block_size, self.config.map)

    def codec(self) -> Quant8Codec:
        """``state_codec()`` (older name, kept for scripts)."""
        return Quant8Codec(self.config.block_size, self.config.map)


@hookimpl
def register_methods(register):
    register(State8bit)
