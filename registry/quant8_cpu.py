"""The fused 8-bit step on CPU as one hand-written loop: decode, the rule's update, absmax, encode, one
block at a time, everything in registers and a block-sized buffer.

Why not torch.compile on CPU: inductor turns the fused graph into ~10 loops per moment (the decoded
moments realized in full-size buffers, int64 gathers with bounds checks, a separate copy into the
state), 5-6x an fp32 AdamW step (docs/benchmarks/quant8_step_time.md). This loop reads each code,
scale, parameter and gradient element once and writes each once: fewer bytes than fp32 AdamW.

How: a rule that declares ``ElementwiseUpdate.c_source`` (its update of one element as a C function,
see ``UpdateRule.elementwise_update``) gets a shared library built with the system C++ compiler
(``c++ -O3 -march=native -fopenmp``; ~1 s, cached under ``$XDG_CACHE_HOME/slimtrain/kernels`` by a
hash of the source and the CPU's model and flags) and called through ctypes on the tensors' raw
pointers: no torch headers, no ninja, no torch version coupling. Rows are split over
``torch.get_num_threads()`` OpenMP threads. ``encode_rows`` / ``decode_rows`` are the codec alone
(``quant8.quantize`` / ``dequantize`` of fp32 CPU tensors use them).

Numbers: decode (codebook value times the block scale, squared for a ``sqrt``-stored moment), the
absmax (NaN propagates, as ``amax``), normalization (``x / absmax``, clamped to the map's range) and
the codes (``quant8.code_table``: the codes of ``quant8.nearest_codes``) are the operations of the
unfused codec in the same order; built with ``-ffp-contract=off`` so the rule's update is the C as
written (an explicit ``std::fma`` where torch's vectorized kernel has one). What may differ from the
torch ops is ``sqrt``: correctly rounded here, torch's vectorized one (Sleef) is 0.5001 ulp, so a
value can be 1 ulp apart: within the 8-bit tolerance of tests/optim/test_quant8_fused.py, which
compares the two (measured there: codes equal, 1-3 parameters in 88064 one ulp apart).

An unavailable compiler raises from ``build`` (the caller logs one line and steps unfused).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["CpuFusedKernel", "build", "decode_rows", "encode_rows"]

_TEMPLATE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>

%(update)s

static inline uint8_t encode_one(float x, const uint8_t* lo, const float* thr) {
    uint32_t bits; std::memcpy(&bits, &x, 4);
    uint32_t i = bits >> 16;
    return (uint8_t)(lo[i] + (x > thr[i] ? 1 : 0));
}

extern "C" void step(
    int64_t rows, int64_t last, int64_t block, int64_t n_blocks, int nthreads,
    float* __restrict param, const float* __restrict grad,
    uint8_t* const* codes, float* const* scales, const float* const* cb,
    const uint8_t* const* lo, const float* const* thr, const float* s)
{
    const int K = %(k)d;
    static const int UNS[K] = {%(uns)s};
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        alignas(64) float buf[K][%(block)d];
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t start = b * block;
            const int64_t len = (start + block <= last) ? block : last - start;
            const int64_t off = r * last + start;
            for (int k = 0; k < K; ++k) {  /* decode: codebook value times the block's scale */
                const float sc = scales[k][r * n_blocks + b];
                const uint8_t* __restrict c = codes[k] + off;
                const float* __restrict t = cb[k];
                float* __restrict x = buf[k];
                for (int64_t i = 0; i < len; ++i) x[i] = t[c[i]] * sc;
                if (UNS[k]) for (int64_t i = 0; i < len; ++i) x[i] = x[i] * x[i];
            }
            float* __restrict pp = param + off;
            const float* __restrict gg = grad + off;
            for (int64_t i = 0; i < len; ++i) {  /* the rule's update */
                float mom[K];
                for (int k = 0; k < K; ++k) mom[k] = buf[k][i];
                float p = pp[i];
                update(&p, gg[i], mom, s);
                pp[i] = p;
                for (int k = 0; k < K; ++k) buf[k][i] = mom[k];
            }
            for (int k = 0; k < K; ++k) {  /* absmax, then the codes */
                float* __restrict x = buf[k];
                if (UNS[k]) for (int64_t i = 0; i < len; ++i) { float v = x[i] < 0.0f ? 0.0f : x[i]; x[i] = std::sqrt(v); }
                /* |x| as bits: ordered like the floats, NaN above infinity, so NaN propagates as in torch.amax */
                uint32_t top = 0;
                for (int64_t i = 0; i < len; ++i) {
                    uint32_t u; std::memcpy(&u, &x[i], 4); u &= 0x7FFFFFFFu;
                    top = u > top ? u : top;
                }
                float amax; std::memcpy(&amax, &top, 4);
                scales[k][r * n_blocks + b] = amax;
                const float safe = amax > 0.0f ? amax : 1.0f;
                for (int64_t i = 0; i < len; ++i) {
                    float v = x[i] / safe;
                    x[i] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
                }
                const uint8_t* __restrict l = lo[k];
                const float* __restrict th = thr[k];
                uint8_t* __restrict out = codes[k] + off;
                for (int64_t i = 0; i < len; ++i) out[i] = encode_one(x[i], l, th);
            }
        }
    }
}
"""


_CODEC = r"""
#include <cmath>
#include <cstdint>
#include <cstring>

extern "C" void encode(int64_t rows, int64_t last, int64_t block, int64_t n_blocks, int nthreads,
                       const float* __restrict src, int sqrt_, uint8_t* __restrict codes, float* __restrict scales,
                       const uint8_t* __restrict lo, const float* __restrict thr)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        alignas(64) float x[%(block)d];
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t start = b * block;
            const int64_t len = (start + block <= last) ? block : last - start;
            const float* __restrict in = src + r * last + start;
            if (sqrt_) for (int64_t i = 0; i < len; ++i) { float v = in[i] < 0.0f ? 0.0f : in[i]; x[i] = std::sqrt(v); }
            else for (int64_t i = 0; i < len; ++i) x[i] = in[i];
            uint32_t top = 0;
            for (int64_t i = 0; i < len; ++i) { uint32_t u; std::memcpy(&u, &x[i], 4); u &= 0x7FFFFFFFu; top = u > top ? u : top; }
            float amax; std::memcpy(&amax, &top, 4);
            scales[r * n_blocks + b] = amax;
            const float safe = amax > 0.0f ? amax : 1.0f;
            for (int64_t i = 0; i < len; ++i) { float v = x[i] / safe; x[i] = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }
            uint8_t* __restrict out = codes + r * last + start;
            for (int64_t i = 0; i < len; ++i) {
                uint32_t bits; std::memcpy(&bits, &x[i], 4); bits >>= 16;
                out[i] = (uint8_t)(lo[bits] + (x[i] > thr[bits] ? 1 : 0));
            }
        }
    }
}

extern "C" void decode(int64_t rows, int64_t last, int64_t block, int64_t n_blocks, int nthreads,
                       const uint8_t* __restrict codes, const float* __restrict scales, const float* __restrict cb,
                       int square, float* __restrict dst)
{
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t start = b * block;
            const int64_t len = (start + block <= last) ? block : last - start;
            const float sc = scales[r * n_blocks + b];
            const uint8_t* __restrict c = codes + r * last + start;
            float* __restrict out = dst + r * last + start;
            for (int64_t i = 0; i < len; ++i) out[i] = cb[c[i]] * sc;
            if (square) for (int64_t i = 0; i < len; ++i) out[i] = out[i] * out[i];
        }
    }
}
"""


@functools.lru_cache(maxsize=None)
def _codec_lib(block_size: int) -> ctypes.CDLL:
    return _compile(_CODEC % {"block": block_size}, ("encode", "decode"))


def encode_rows(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block_size: int, sqrt: bool,
                lo: torch.Tensor, thr: torch.Tensor) -> None:
    """``quant8.quantize``'s codes and scales of the contiguous fp32 ``x`` (rows, last), written into
    ``codes`` / ``scales``: the same operations (sqrt of max(x, 0), absmax, x / absmax clamped, the
    code table), bit for bit."""
    rows, last = x.shape
    nb = scales.shape[-1]
    _codec_lib(block_size).encode(
        ctypes.c_int64(rows), ctypes.c_int64(last), ctypes.c_int64(block_size), ctypes.c_int64(nb),
        ctypes.c_int(max(1, torch.get_num_threads())), ctypes.c_void_p(x.data_ptr()), ctypes.c_int(int(sqrt)),
        ctypes.c_void_p(codes.data_ptr()), ctypes.c_void_p(scales.data_ptr()),
        ctypes.c_void_p(lo.data_ptr()), ctypes.c_void_p(thr.data_ptr()))


def decode_rows(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, block_size: int, square: bool,
                cb: torch.Tensor) -> None:
    """``quant8.dequantize`` of contiguous (rows, last) codes into the fp32 ``out``, bit for bit."""
    rows, last = codes.shape
    nb = scales.shape[-1]
    _codec_lib(block_size).decode(
        ctypes.c_int64(rows), ctypes.c_int64(last), ctypes.c_int64(block_size), ctypes.c_int64(nb),
        ctypes.c_int(max(1, torch.get_num_threads())), ctypes.c_void_p(codes.data_ptr()),
        ctypes.c_void_p(scales.data_ptr()), ctypes.c_void_p(cb.data_ptr()), ctypes.c_int(int(square)),
        ctypes.c_void_p(out.data_ptr()))



def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimtrain" / "kernels"


_LIBS: dict[str, ctypes.CDLL] = {}


@functools.lru_cache(maxsize=None)
def _cpu_identity() -> str:
    """The host CPU's model and feature flags: the libraries are built for it (``-march=native``),
    so a cache shared by machines with other CPUs keys them apart."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(dict.fromkeys(keep))


def _compile(source: str, symbols: tuple[str, ...]) -> ctypes.CDLL:
    key = hashlib.sha256((source + _cpu_identity()).encode()).hexdigest()[:16]
    if key in _LIBS:
        return _LIBS[key]
    out = _cache_dir() / f"quant8_{key}.so"
    if not out.exists():
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            raise RuntimeError("no C++ compiler found (c++, g++, clang++ or $CXX)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src, lib = Path(tmp) / "k.cpp", Path(tmp) / "k.so"
            src.write_text(source)
            cmd = [cxx, "-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC",
                   str(src), "-o", str(lib)]
            try:
                # -march=native: the update loop vectorizes only with the CPU's FMA (std::fma, which
                # torch's vectorized lerp uses, is a libm call otherwise); a compiler without it: plain
                res = subprocess.run(cmd[:2] + ["-march=native"] + cmd[2:], capture_output=True, text=True)
                if res.returncode != 0:
                    res = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as exc:
                raise RuntimeError(f"C++ compiler {cxx} unavailable: {exc}") from exc
            if res.returncode != 0:
                raise RuntimeError(f"C++ compile failed: {(res.stderr or res.stdout).strip().splitlines()[:1]}")
            os.replace(lib, out)  # atomic: concurrent ranks build the same file
    lib = ctypes.CDLL(str(out))
    for name in symbols:
        getattr(lib, name).restype = None
    _LIBS[key] = lib
    return lib


def build(c_update: str, unsigned: tuple[bool, ...], block_size: int) -> ctypes.CDLL:
    """The shared library of ``c_update`` (cached on disk and in the process); raises when no
    compiler is found or compiling fails."""
    uns = ", ".join(str(int(u)) for u in unsigned)
    return _compile(_TEMPLATE % {"update": c_update, "k": len(unsigned), "block": block_size, "uns": uns}, ("step",))


def _ptrs(ctype, tensors):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class CpuFusedKernel:
    """Decode + ``c_update`` + encode of one parameter's local rows, in place."""

    def __init__(self, c_update: str, unsigned: tuple[bool, ...], block_size: int, tables):
        self.lib = build(c_update, tuple(unsigned), block_size)
        self.unsigned, self.block_size = tuple(unsigned), block_size
        # per moment: codebook (fp32, 256), code table (uint8 / fp32, 65536): kept alive here
        self.tables = tables
        self._cb = _ptrs(ctypes.c_void_p, [t[0] for t in tables])
        self._lo = _ptrs(ctypes.c_void_p, [t[1] for t in tables])
        self._thr = _ptrs(ctypes.c_void_p, [t[2] for t in tables])

    @staticmethod
    def accepts(param: torch.Tensor, grad: torch.Tensor, codes_scales: list[torch.Tensor]) -> bool:
        ts = [param, grad, *codes_scales]
        return (param.device.type == "cpu" and all(t.is_contiguous() and t.device.type == "cpu" for t in ts)
                and param.dtype == grad.dtype == torch.float32)

    def __call__(self, param: torch.Tensor, grad: torch.Tensor, codes_scales: list[torch.Tensor],
                 scalars: torch.Tensor) -> None:
        from slimtrain.registry.quant8 import n_blocks

        last = param.shape[-1]
        rows = param.numel() // last
        nb = n_blocks(last, self.block_size)
        scalars = scalars.to(torch.float32).contiguous()
        codes = _ptrs(ctypes.c_void_p, codes_scales[0::2])
        scales = _ptrs(ctypes.c_void_p, codes_scales[1::2])
        self.lib.step(
            ctypes.c_int64(rows), ctypes.c_int64(last), ctypes.c_int64(self.block_size), ctypes.c_int64(nb),
            ctypes.c_int(max(1, torch.get_num_threads())),
            ctypes.c_void_p(param.data_ptr()), ctypes.c_void_p(grad.data_ptr()),
            codes, scales, self._cb, self._lo, self._thr, ctypes.c_void_p(scalars.data_ptr()),
        )
