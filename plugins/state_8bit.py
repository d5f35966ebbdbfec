"""8-bit optimizer state: every state tensor an update rule declares ``moment=True`` is stored
block-wise quantized (``slimtrain.registry.quant8``) and dequantized to its declared dtype for the update.

It knows no rule and no key name: it reads the rules' declarations (``StateSpec.moment``), so it
composes with adamw, galore, fira and every rule that declares its state. Projections, limiters,
step counts and other non-moment state stay in full precision; so do 1-D moments (norm weights and
biases: a negligible share, and a 1-D "rows" shard under FSDP2 would split blocks across ranks).

Stored per moment ``<name>``: ``<name>_q8`` (uint8 codes, the moment's shape and layout) and
``<name>_absmax`` (fp32, ``shape[:-1] + (n_blocks,)``, row-sharded like it). First moments use the
signed map, second moments (names ending in ``exp_avg_sq`` or ``v``: the only unsigned moments the
built-in rules declare) the unsigned map applied to ``sqrt(v)``: the update reads ``sqrt(v)``, and
``v`` spans twice the orders of magnitude of ``sqrt(v)``, so quantizing ``v`` itself rounds more small
entries to 0, where ``m / (sqrt(v) + eps)`` blows up (``benchmarks/quant8_error.py`` measures both).
A rule names non-negative moments per ``UNSIGNED``. Plain tensors (DTensors under FSDP2), so DCP saves and reshards them and a resume
is bitwise: the codes and scales are the state.

How it is installed: ``install_codec(optimizer, codec)`` on a built ``ComposedOptimizer`` re-encodes
the state the optimizer created and sets its codec (titan_integration/memory_layers.py does it for
the trainer). Bad input (block_size <= 0, an unknown map, a composition whose optimizer rules
declare no moment) is refused before training, naming ``state_8bit``, the key and the value.
"""

from __future__ import annotations

import dataclasses

import torch

from slimtrain.registry import ConfigError, Method, hookimpl
from slimtrain.registry.composed_optimizer import StateCodec
from slimtrain.registry.quant8 import MAPS, dequantize, quantize
from slimtrain.registry.update_rule import StateSpec

NAME = "state_8bit"
#: declaration names stored with the unsigned map (non-negative moments)
UNSIGNED = ("exp_avg_sq", "v", "second_moment")


@dataclasses.dataclass(frozen=True)
class State8bitConfig:
    block_size: int = 256
    map: str = "dynamic"

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
            raise ConfigError(f"[{NAME}] block_size = {self.block_size!r}; allowed: an integer > 0 (e.g. 256)")
        if self.map not in MAPS:
            raise ConfigError(f"[{NAME}] map = {self.map!r}; allowed: {', '.join(MAPS)}")


def quantized(decl: StateSpec) -> bool:
    """Whether ``state_8bit`` stores this declaration quantized."""
    return decl.moment and len(decl.shape) >= 2


def is_unsigned(decl: StateSpec) -> bool:
    return decl.name in UNSIGNED or decl.name.endswith("exp_avg_sq")


class Quant8Codec(StateCodec):
    """``StateCodec`` that stores 2-D+ moments as uint8 codes plus fp32 block scales."""

    def __init__(self, block_size: int = 256, kind: str = "dynamic") -> None:
        State8bitConfig(block_size, kind)  # same checks, same messages
        self.block_size = block_size
        self.kind = kind

    def stored_keys(self, decl: StateSpec) -> tuple[str, ...]:
        if not quantized(decl):
            return (decl.name,)
        return (f"{decl.name}_q8", f"{decl.name}_absmax")

    def encode(self, decl: StateSpec, value: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if not quantized(decl):
            state[decl.name] = value
            return
        from slimtrain.registry.tensors import is_dtensor, local_tensor

        local = local_tensor(value)
        unsigned = is_unsigned(decl)  # stored as sqrt(v): the update reads sqrt(v), and its range is half v's
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
        if not quantized(decl):
            return state[decl.name]
        from slimtrain.registry.tensors import is_dtensor, local_tensor

        ckey, skey = self.stored_keys(decl)
        codes = state[ckey]
        unsigned = is_unsigned(decl)
        out = dequantize(
            local_tensor(codes), local_tensor(state[skey]), signed=not unsigned, kind=self.kind,
            block_size=self.block_size, dtype=dtype, square=unsigned,
        )
        if is_dtensor(codes):
            out = _like(codes, out, decl.shape)
        return out


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
    """Store ``optimizer``'s (a ``ComposedOptimizer``) moments through ``codec`` from now on:
    re-encode the state it holds and set its codec. Returns how many tensors are now encoded."""
    if getattr(optimizer, "codec", None) is not None:
        raise ConfigError(f"[{NAME}] the optimizer already stores its state through {type(optimizer.codec).__name__}")
    n = 0
    for p, decls in optimizer.declared.items():
        state = optimizer.state[p]
        for decl in decls:
            if decl.moment:
                value = state.pop(decl.name)
                codec.encode(decl, value, state)
                n += quantized(decl)
    optimizer.codec = codec
    return n


def check_declares_moments(composition) -> None:
    """Refuse a composition whose optimizer rules declare no moment (nothing to store in 8 bits)."""
    from slimtrain.registry.update_rule import UpdateRule

    for m in composition.optimizer_methods:
        rule = m.update_rule()
        if type(rule).state_specs is UpdateRule.state_specs:
            raise ConfigError(
                f"[{NAME}] optimizer method {m.name!r} declares no state (its update rule has no state_specs); "
                f"{NAME} stores only declared moments"
            )


class State8bit(Method):
    """Marker method: the trainer installs ``Quant8Codec`` on the composed optimizer."""

    name = NAME
    Config = State8bitConfig
    provides = frozenset()
    summary = "optimizer moments stored block-wise in 8 bits (uint8 codes + fp32 absmax per block)"

    def codec(self) -> Quant8Codec:
        return Quant8Codec(self.config.block_size, self.config.map)


@hookimpl
def register_methods(register):
    register(State8bit)
