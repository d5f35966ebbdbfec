"""Block-wise 8-bit quantization of optimizer moments (what ``state_8bit`` stores).

A tensor is cut, row by row along its LAST dimension, into blocks of ``block_size`` elements (the
last block of a row may be shorter: sizes need not be a multiple of the block). Each block keeps one
fp32 scale, its absolute maximum, and one uint8 code per element: the index of the nearest entry of
a fixed codebook on [-1, 1] (signed, first moments) or [0, 1] (unsigned, second moments).

Why row-aligned blocks: under FSDP2 a "rows" state tensor is a Shard(0) DTensor; blocks that never
cross a row keep codes (same shape as the value) and scales (``shape[:-1] + (n_blocks,)``) shardable
by the same rows, so DCP saves and reshards them like any other state.

Why a codebook and which one: ``dynamic`` is a power map, ``sign(c) * |c / C|^3`` (C = 127 signed,
255 unsigned), dense near zero, so the many small entries of a block whose absmax is set by one
outlier keep their relative precision; ``linear`` is ``c / C``. On Adam-moment-like data the dynamic
map's error in the update ``m / (sqrt(v) + eps)`` is many times smaller than the linear map's (the
figures are in docs/methods/memory-layers.md, ``benchmarks/quant8_error.py``), so it is the default.

Why not torchao: see docs/methods/memory-layers.md (its ``OptimState8bit`` works on CPU, but it is a
tensor subclass with a single flat block list, gives a tensor whose size is not a multiple of the
block one scale for the whole tail, and its wheels pin one torch version; slimtrain supports 2.11 to
2.14 and stores state as plain tensors the composed optimizer and DCP handle unchanged).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["MAPS", "Quantized", "code_table", "codebook", "dequantize", "max_gap", "n_blocks", "nearest_codes", "quantize",
           "table_codes"]

MAPS = ("dynamic", "linear")
_POWER = {"dynamic": 3.0, "linear": 1.0}


def _check(kind: str, block_size: int) -> None:
    if kind not in MAPS:
        raise ValueError(f"quantization map = {kind!r}; allowed: {', '.join(MAPS)}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size = {block_size!r}; allowed: an integer > 0")


@functools.lru_cache(maxsize=None)
def _codebook_cpu(kind: str, signed: bool) -> torch.Tensor:
    p = _POWER[kind]
    if signed:
        c = torch.arange(-127, 128, dtype=torch.float64) / 127.0
    else:
        c = torch.arange(0, 256, dtype=torch.float64) / 255.0
    return (c.sign() * c.abs() ** p).to(torch.float32)


def codebook(kind: str, signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The sorted code values (255 signed: code 0 is -1, code 127 is 0; 256 unsigned)."""
    _check(kind, 1)
    return _codebook_cpu(kind, signed).to(device)


def max_gap(kind: str, signed: bool) -> float:
    """Largest distance between neighbouring code values: nearest rounding errs by at most half
    of it times the block's scale."""
    cb = _codebook_cpu(kind, signed)
    return float((cb[1:] - cb[:-1]).max())


def n_blocks(last_dim: int, block_size: int) -> int:
    return max(1, math.ceil(last_dim / block_size))


class Quantized(tuple):
    """(codes uint8 of the value's shape, scales fp32 of shape ``shape[:-1] + (n_blocks,)``)."""

    @property
    def codes(self) -> torch.Tensor:
        return self[0]

    @property
    def scales(self) -> torch.Tensor:
        return self[1]


def _blocked(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """``x`` as (rows, n_blocks, block_size), zero-padded at the end of each row."""
    last = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, last)
    nb = n_blocks(last, block_size)
    pad = nb * block_size - last
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], nb, block_size), pad


def nearest_codes(normed: torch.Tensor, kind: str, signed: bool) -> torch.Tensor:
    """Index of the nearest codebook entry for every element of ``normed`` (in [-1, 1], or [0, 1]
    unsigned), ties to the lower code: what ``torch.bucketize(normed, midpoints)`` returns, but
    without its binary search, which on CPU took 92% of an 8-bit AdamW step (0.39 of 0.43 s at the
    tiny flavor).

    The map is a power, so its inverse gives ``lo``, the code just below each value, and the
    midpoint between ``lo`` and ``lo + 1`` picks the nearer one. Rounding can put ``lo`` one off,
    but only for a value within rounding error of a code value (that is where the inverse crosses an
    integer), and such a value lies far from both neighbouring midpoints, so the same midpoint test
    still returns that code (test_quant8 checks it against bucketize at the codes, the midpoints and
    their float neighbours)."""
    cb = codebook(kind, signed, normed.device)
    mids = (cb[1:] + cb[:-1]) * 0.5
    center, half = (127.0, 127.0) if signed else (0.0, 255.0)
    shape, flat = normed.shape, normed.reshape(-1)
    u = flat.abs()
    if _POWER[kind] != 1.0:
        u.pow_(1.0 / _POWER[kind])
    u.mul_(half)
    if signed:
        u.copysign_(flat).add_(center)
    lo = u.nan_to_num_(nan=0.0).floor_().clamp_(0, cb.numel() - 2)  # NaN: any code, its block's scale is NaN
    codes = lo.to(torch.uint8)
    codes.add_(mids.index_select(0, lo.long()) < flat)  # uint8 + bool: ~15x faster on CPU than int64 += bool
    return codes.reshape(shape)


@functools.lru_cache(maxsize=None)
def _code_table_cpu(kind: str, signed: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    cb = _codebook_cpu(kind, signed)
    mids = (cb[1:] + cb[:-1]) * 0.5
    prefix = torch.arange(1 << 16, dtype=torch.int32)
    ends = torch.stack([(prefix << 16).view(torch.float32), ((prefix << 16) | 0xFFFF).view(torch.float32)])
    # normed values are in [-1, 1] (the clamp maps +-inf to +-1), so the buckets of exponent 255 hold
    # only NaN there: code 0, as nearest_codes gives (a NaN's block has a NaN scale: any code decodes NaN)
    nan = ends.isnan().any(0)
    ends = ends.nan_to_num(nan=0.0).clamp(-1.0, 1.0)
    low, high = ends.amin(0), ends.amax(0)
    c_low, c_high = torch.bucketize(low, mids), torch.bucketize(high, mids)
    c_low[nan], c_high[nan] = 0, 0
    if int((c_high - c_low).max()) > 1:
        return None  # two midpoints in one bucket: the table cannot decide with one comparison
    thr = torch.where(c_high > c_low, mids[c_low.clamp(max=mids.numel() - 1)], torch.full_like(low, float("inf")))
    return c_low.to(torch.uint8), thr


def code_table(kind: str, signed: bool, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """The nearest code by lookup: ``(lo, thr)``, 65536 entries each, indexed by the top 16 bits of
    a value's fp32 pattern (sign, exponent, 7 mantissa bits: a bucket of relative width 2^-7). Every
    value of a bucket has the code ``lo`` or ``lo + 1``, the latter exactly where it lies above
    ``thr``, the one midpoint inside the bucket (``+inf`` where there is none): the codes of
    ``nearest_codes`` / ``bucketize`` with two table reads and one comparison, no cube root.
    None for a map whose midpoints lie closer than a bucket (``linear`` near 1: its codes are a
    cheap product anyway)."""
    _check(kind, 1)
    if _POWER[kind] == 1.0:
        return None
    t = _code_table_cpu(kind, signed)
    return None if t is None else (t[0].to(device), t[1].to(device))


def table_codes(normed: torch.Tensor, lo: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """``nearest_codes`` through ``code_table`` (``normed`` fp32, clamped to the map's range)."""
    idx = (normed.view(torch.int32) >> 16) & 0xFFFF
    return lo[idx] + (normed > thr[idx]).to(torch.uint8)


#: rows are encoded and decoded this many elements at a time (at least one row), so the codec's
#: temporaries stay ~26 bytes x CHUNK_ELEMENTS (~100 MB) whatever the moment's size: a 7B embedding's
#: moments (131M elements) would otherwise take ~3.4 GB of temporaries (the memory model counts this)
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, last: int):
    step = max(1, CHUNK_ELEMENTS // max(1, last))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _native(t: torch.Tensor, block_size: int, fp32: bool = True) -> bool:
    """Whether the codec's CPU loops (``quant8_cpu``: one pass per block, bit for bit the torch ops
    below) serve ``t``: a contiguous CPU tensor, fp32 where ``fp32``, a block that fits the loop's
    buffer, and native code allowed (``SLIMTRAIN_FUSED_CODEC=compile``, the default; the test suite
    runs ``eager``). A compiler that is missing switches it off with one logged line."""
    if t.device.type != "cpu" or not t.is_contiguous() or block_size > 16384 or (fp32 and t.dtype != torch.float32):
        return False
    from slimtrain.registry import quant8_fused

    if quant8_fused.MODE != "compile" or not quant8_fused.fused_available():
        return False
    try:
        from slimtrain.registry import quant8_cpu

        quant8_cpu._codec_lib(block_size)
    except Exception as exc:  # noqa: BLE001  (no compiler, a failed build)
        quant8_fused.disable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
        return False
    return True


def quantize(x: torch.Tensor, *, signed: bool, kind: str = "dynamic", block_size: int = 256,
             sqrt: bool = False) -> Quantized:
    """Encode ``x`` (any float dtype, at least 1-D); with ``sqrt``, encode ``sqrt(max(x, 0))`` (second
    moments: see plugins/state_8bit.py) without a full-size copy. Unsigned maps need ``x >= 0``;
    negative entries round to 0. A block holding a NaN or an infinity gets a non-finite scale, so it
    decodes to non-finite values: a diverged moment stays visible in the loss instead of being
    rounded away (no error here: checking would cost a device sync per tensor per step)."""
    _check(kind, block_size)
    if x.dim() == 0:
        raise ValueError("quantize needs a tensor with at least one dimension")
    last = x.shape[-1]
    rows = x.detach().reshape(-1, last)
    nb = n_blocks(last, block_size)
    codes = torch.empty(rows.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows.shape[0], nb), dtype=torch.float32, device=x.device)
    table = code_table(kind, signed) if x.device.type == "cpu" else None
    if table is not None and _native(rows, block_size):
        from slimtrain.registry.quant8_cpu import encode_rows

        encode_rows(rows, codes, scales, block_size, sqrt, *table)
        return Quantized((codes.reshape(x.shape), scales.reshape(*x.shape[:-1], nb)))
    for a, b in _row_chunks(rows.shape[0], last):
        part = rows[a:b].to(torch.float32)  # a view when x is fp32: nothing below writes into it
        if sqrt:
            part = part.clamp_min(0).sqrt_()
        blocks, _ = _blocked(part, block_size)
        amax = blocks.abs().amax(dim=-1)  # (chunk rows, nb)
        scales[a:b] = amax
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        normed = (blocks / safe.unsqueeze(-1)).clamp_(-1.0, 1.0)
        codes[a:b] = nearest_codes(normed, kind, signed).reshape(b - a, -1)[:, :last]
    return Quantized((codes.reshape(x.shape), scales.reshape(*x.shape[:-1], nb)))


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, *, signed: bool, kind: str = "dynamic", block_size: int = 256,
    dtype: torch.dtype = torch.float32, square: bool = False,
) -> torch.Tensor:
    """Decode codes and scales from ``quantize`` back to a ``dtype`` tensor of the codes' shape;
    ``square`` undoes ``quantize(..., sqrt=True)``."""
    _check(kind, block_size)
    cb = codebook(kind, signed, codes.device)
    last = codes.shape[-1]
    rows = codes.reshape(-1, last)
    nb = n_blocks(last, block_size)
    row_scales = scales.reshape(rows.shape[0], nb).to(torch.float32)
    out = torch.empty(rows.shape, dtype=dtype, device=codes.device)
    if dtype == torch.float32 and _native(rows, block_size, fp32=False):
        from slimtrain.registry.quant8_cpu import decode_rows

        decode_rows(rows, row_scales.contiguous(), out, block_size, square, cb)
        return out.reshape(codes.shape)
    for a, b in _row_chunks(rows.shape[0], last):
        values = cb.index_select(0, rows[a:b].reshape(-1).long()).reshape(b - a, last)  # faster than cb[codes] on CPU
        blocks, _ = _blocked(values, block_size)
        blocks.mul_(row_scales[a:b].unsqueeze(-1))
        if square:
            blocks.square_()
        out[a:b] = blocks.reshape(b - a, -1)[:, :last]
    return out.reshape(codes.shape)
