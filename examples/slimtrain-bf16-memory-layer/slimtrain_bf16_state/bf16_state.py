"""A memory layer: every optimizer moment (``StateSpec.moment``) stored in bf16, 2 bytes per element.

Rounded stochastically (round-to-nearest would lose small Adam updates: ``m <- 0.9 m + 0.1 g`` often
moves ``m`` by less than half a bf16 step). The random bits are a hash of the fp32 value itself, so the
codec keeps no RNG state: a resume is bitwise (the bf16 tensors are the state), and each rank's row
shard rounds exactly as the unsharded tensor would. The rule still sees its declared dtype.
"""

from __future__ import annotations

import torch

from slimtrain import Capability, Method, StateCodec, StateSpec, hookimpl, is_dtensor, local_tensor

GOLDEN = -1640531535  # 0x9E3779B1 as int32: multiplicative hashing of the value's bits


def stochastic_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bf16, up with probability equal to the dropped fraction (random bits: a hash)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = ((bits * GOLDEN) >> 16) & 0xFFFF  # 16 pseudo-random bits per element
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact in bf16


class Bf16Codec(StateCodec):
    def serves(self, decl: StateSpec) -> bool:
        return decl.moment and bool(decl.shape)

    def stored_keys(self, decl: StateSpec) -> tuple[str, ...]:
        return (f"{decl.name}_bf16",)

    def encode(self, decl: StateSpec, value: torch.Tensor, state: dict) -> None:
        key = self.stored_keys(decl)[0]
        rounded = stochastic_bf16(local_tensor(value))
        if key in state:
            local_tensor(state[key]).copy_(rounded)  # in place: keeps DTensor wrappers
        elif is_dtensor(value):
            from torch.distributed.tensor import DTensor

            state[key] = DTensor.from_local(rounded, value.device_mesh, value.placements,
                                            shape=value.shape, stride=value.stride(), run_check=False)
        else:
            state[key] = rounded

    def decode(self, decl: StateSpec, state: dict, dtype: torch.dtype) -> torch.Tensor:
        stored = state[self.stored_keys(decl)[0]]
        return stored.to(dtype)  # DTensors convert per shard

    def stored_bytes(self, decl: StateSpec, bytes_per_element: int) -> int:
        return 2 * decl.numel

    def coding_bytes(self, decl: StateSpec, bytes_per_element: int) -> int:
        return 12 * decl.numel  # the hash, the sum and the fp32 copy of a non-fp32 value (int32 each)


class Bf16State(Method):
    name = "bf16_state"
    summary = "optimizer moments stored in bf16 with stochastic rounding (2 bytes per element)"
    provides = frozenset({Capability.STATE_CODEC})

    def state_codec(self) -> Bf16Codec:
        return Bf16Codec()


@hookimpl
def register_methods(register):
    register(Bf16State)
