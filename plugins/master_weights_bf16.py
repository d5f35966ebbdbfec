"""Compressed master weights: every parameter stored as bf16 plus an 8-bit correction (a memory layer).

FlashOptim (arXiv 2602.23349) and HeavyBall's ``ecc="bf16+8"``: instead of an fp32 master copy
(4 bytes per parameter) next to the bf16 weights, keep the bf16 weight ``w_b`` (what forward and
backward use) and an int8 ``q`` per element with ``w ~= w_b + q / 127 * h``, where ``h`` is half a
bf16 unit in the last place of ``w_b`` (``2^(e - 8)`` for ``|w_b|`` in ``[2^e, 2^(e+1))``): the
rounding error ``w - w_b`` of round-to-nearest is at most ``h``, so the 8 bits carry the next ~8
mantissa bits and the scale is implied by ``w_b``'s exponent: 2 + 1 bytes per parameter, no scale
stored. Each step the composed optimizer restores the fp32 weight of one parameter, the rule
updates it (gradient cast to fp32, state declared without a dtype kept in fp32), and the layer
splits it back (round to nearest bf16, then the correction of the remainder). Reconstruction error
after a split: at most ``h / 254``, about ``2^-16`` relative (fp32: ``2^-24``); the gap to an fp32-master
run over many steps on the same gradients is measured in tests/optim/test_master_weights_bf16.py.

Every part of it is deterministic elementwise arithmetic on the local shard, so the bf16 weight and
the int8 correction (``master_correction`` in the optimizer state, a DTensor placed like the
parameter) are the whole state: a resume is bitwise. It knows no rule: it composes with every
optimizer rule (the rule sees an fp32 parameter), with a state codec (8-bit state) and a stepper
(per-layer updates). Frozen floating-point parameters are stored in bf16 too (no correction: they
never change). Counted by the memory models as 1 byte of optimizer state per trainable element
(``stored_bytes``); the weights are the bf16 ones.

Bad input, refused before the model is materialized: a parameter that is not floating point
(naming the method, the parameter and its dtype: ``store_parameters``), and a method whose step hook
writes parameters outside the optimizer step (merges, refactorizations), whose new weights would
not match their corrections (the composition names both).
"""

from __future__ import annotations

import torch

from slimtrain.registry import Capability, Method, hookimpl
from slimtrain.registry.master_weights import MasterWeights
from slimtrain.registry.method import ParamSpec

NAME = "master_weights_bf16"
KEY = "master_correction"
LEVELS = 127  # int8 codes in [-127, 127]
CHUNK = 1 << 20  # elements restored / split at a time (bounds the temporaries)
MANTISSA_BITS = 7  # bf16's stored mantissa bits


EXPONENT_MASK = 0x7F800000  # fp32's exponent field
HALF_ULP_SHIFT = (MANTISSA_BITS + 1) << 23  # 2^e -> 2^(e - 8): 8 off the exponent field
SMALLEST = 1 << 23  # 2^-126, the smallest normal fp32: the half ulp of zero and of subnormals


def _half_ulp(stored: torch.Tensor) -> torch.Tensor:
    """Half a bf16 unit in the last place of each element of ``stored`` (the fp32 of a bf16): 2^(e - 8)
    for ``|stored|`` in ``[2^e, 2^(e+1))``, read off the exponent bits (torch.frexp / ldexp are 200x
    slower on CPU); 2^-126 for zero and subnormals."""
    exponent = stored.view(torch.int32) & EXPONENT_MASK
    return (exponent - HALF_ULP_SHIFT).clamp_(min=SMALLEST).view(torch.float32)


def split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``master`` (fp32) as (bf16 nearest, int8 correction of the remainder)."""
    stored = master.to(torch.bfloat16)
    wide = stored.float()
    q = torch.round((master - wide) / _half_ulp(wide) * LEVELS).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return stored, q


def restore(stored: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The fp32 weight from its bf16 part and int8 correction."""
    wide = stored.float()
    return wide + q.float() * (_half_ulp(wide) / LEVELS)


class Bf16Correction(MasterWeights):
    """bf16 parameters plus an int8 correction scaled by half a bf16 ulp (module docstring)."""

    storage_dtype = torch.bfloat16
    master_dtype = torch.float32

    def stored_keys(self) -> tuple[str, ...]:
        return (KEY,)

    def init_state(self, param: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        from slimtrain.registry.tensors import is_dtensor, local_tensor

        local = torch.zeros(local_tensor(param).shape, dtype=torch.int8, device=local_tensor(param).device)
        if is_dtensor(param):
            from torch.distributed.tensor import DTensor

            local = DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                       stride=param.stride(), run_check=False)
        state[KEY] = local  # zero: the stored bf16 weight is the master weight to start with

    def restore(self, local_param: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        from slimtrain.registry.tensors import local_tensor

        q = local_tensor(state[KEY])
        if not (local_param.is_contiguous() and q.is_contiguous()):
            return restore(local_param, q)
        out = torch.empty(local_param.shape, dtype=torch.float32, device=local_param.device)
        flat, fq, fo = local_param.view(-1), q.view(-1), out.view(-1)
        for a in range(0, flat.numel(), CHUNK):  # chunks: the same elementwise result, fewer temporaries
            fo[a:a + CHUNK] = restore(flat[a:a + CHUNK], fq[a:a + CHUNK])
        return out

    def store(self, local_param: torch.Tensor, master: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        from slimtrain.registry.tensors import local_tensor

        q = local_tensor(state[KEY])
        if not (local_param.is_contiguous() and q.is_contiguous() and master.is_contiguous()):
            stored, codes = split(master)
            local_param.copy_(stored)
            q.copy_(codes)
            return
        flat, fq, fm = local_param.view(-1), q.view(-1), master.view(-1)
        for a in range(0, flat.numel(), CHUNK):
            stored, codes = split(fm[a:a + CHUNK])
            flat[a:a + CHUNK] = stored
            fq[a:a + CHUNK] = codes

    def stored_bytes(self, spec: ParamSpec) -> int:
        """One int8 correction per element; the scale is implied by the bf16 exponent (0 bytes)."""
        return spec.numel

    def coding_bytes(self, spec: ParamSpec) -> int:
        """The fp32 master copy and the fp32 gradient (8 bytes per element), and splitting or
        restoring's temporaries, ``CHUNK`` elements at a time: the widened bf16, the int32 exponent, the
        half ulp, the quotient and the codes (at most 20 bytes per element alive at once)."""
        return 8 * spec.numel + 20 * min(spec.numel, CHUNK)


class MasterWeightsBf16(Method):
    """A memory layer: parameters as bf16 + int8 correction instead of an fp32 master copy."""

    name = NAME
    summary = "master weights as bf16 + an 8-bit correction (FlashOptim / HeavyBall bf16+8): 3 bytes per parameter"
    provides = frozenset({Capability.MASTER_WEIGHTS})

    def master_weights(self) -> Bf16Correction:
        return Bf16Correction()


@hookimpl
def register_methods(register):
    register(MasterWeightsBf16)
