"""The 8-bit codec fused with a rule's elementwise update: decode, update, encode in one compiled kernel.

Why: unfused, an 8-bit AdamW step is ~20 full passes over the moments (decode: gather, pad, scale,
square; the update; encode: sqrt, pad, absmax, normalize, the cube root, floor, midpoint gather and
compare), with int64 and fp32 temporaries of the moment's size: 7-11x fp32 AdamW on CPU
(docs/benchmarks/quant8_fused.md has the profile). A rule that declares its update as a pure
elementwise function (``UpdateRule.elementwise_update``) lets the codec trace decode + update + encode
into one graph that ``torch.compile`` turns into a few loops (C++ on CPU, triton on GPU).

Numbers: the decode is the same codebook lookup and scale product as ``quant8.dequantize``; the
encode picks codes by the same midpoint test as ``quant8.nearest_codes`` (the cube root only guesses
the code below; the midpoint comparison decides, so a root that rounds differently gives the same
code). The update itself may differ from eager in the last bits (the compiler fuses and may contract
a * b + c), so a code can differ by one where the updated moment lies within an ulp of a midpoint:
within the 8-bit tolerance of tests/optim/test_quant8.py. Codes and scales stay the plain (or DTensor
local) tensors of the state, written in place: checkpoints and resume are unchanged.

On CPU, a rule that also gives its update in C (``ElementwiseUpdate.c_source``) runs through
``slimtrain.registry.quant8_cpu`` instead: one hand-written pass per block (inductor's CPU code for
this graph is ~10 loops with full-size buffers: 5x fp32 AdamW; the loop 0.9-1.2x, measured in
docs/benchmarks/quant8_step_time.md).

Unavailable backend: the first call of a kernel that fails to compile (no C++ compiler, no triton)
logs one line and switches fusion off for the process; the step then runs unfused (the same numbers
as before this module). ``SLIMTRAIN_FUSED_CODEC`` (``MODE`` below) chooses compiled, eager or off.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from slimtrain.registry.quant8 import code_table, codebook, n_blocks, table_codes

__all__ = ["FusedCodecKernel", "fused_available", "disable"]

log = logging.getLogger(__name__)

#: ``SLIMTRAIN_FUSED_CODEC``: ``compile`` (default: on CPU the hand-written loop of ``quant8_cpu`` where
#: the rule gives its update in C, else the fused graph compiled by torch.compile), ``inductor`` (the
#: graph compiled by torch.compile on CPU too), ``eager`` (the same graph
#: run op by op: the test suite's setting, where a compile per shape would cost minutes on a small
#: CPU), ``0`` / ``off`` (not fused: decode, the rule's step, encode)
MODE = os.environ.get("SLIMTRAIN_FUSED_CODEC", "compile").strip().lower()
_state = {"off": MODE in ("0", "off", "false", "no"), "why": None}


def fused_available() -> bool:
    return not _state["off"]


def disable(why: str) -> None:
    """Switch fusion off for the process, logging ``why`` once."""
    if not _state["off"]:
        log.warning("slimtrain: fused 8-bit optimizer step unavailable (%s); stepping unfused", why)
    _state["off"], _state["why"] = True, why


def _split(x, block_size: int):
    """``x`` (rows, last) as its whole blocks (rows, n_full, block_size) and its tail (rows, rest) or
    None: no padding (the compiled graph with pad + reshape miscomputed the tail block)."""
    rows, last = x.shape
    full = last // block_size
    head = x[:, : full * block_size].reshape(rows, full, block_size) if full else None
    tail = x[:, full * block_size:] if last % block_size else None
    return head, tail


def _decode(codes, scales, cb, block_size: int, square: bool):
    rows, last = codes.shape
    head, tail = _split(codes, block_size)
    parts = []
    if head is not None:
        x = cb[head.long()] * scales[:, : head.shape[1]].unsqueeze(-1)
        parts.append(x.reshape(rows, -1))
    if tail is not None:
        parts.append(cb[tail.long()] * scales[:, -1:])
    x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return x * x if square else x


def _codes(normed, mids, power: float, signed: bool, table=None):
    if table is not None:  # the dynamic map: two reads of a 65536-entry table, one comparison
        return table_codes(normed, *table)
    u = normed.abs()
    if power != 1.0:
        u = u.pow(1.0 / power)
    if signed:
        u = (u * 127.0).copysign(normed) + 127.0
    else:
        u = u * 255.0
    lo = torch.nan_to_num(u, nan=0.0).floor().clamp(0, mids.numel() - 1).long()
    return (lo + (mids[lo] < normed).long()).to(torch.uint8)


def _encode(x, mids, block_size: int, power: float, signed: bool, sqrt: bool, table=None):
    rows, last = x.shape
    if sqrt:
        x = x.clamp_min(0).sqrt()
    head, tail = _split(x, block_size)
    codes, amaxes = [], []
    for part, blocked in ((head, True), (tail, False)):
        if part is None:
            continue
        amax = part.abs().amax(dim=-1, keepdim=True)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        normed = (part / safe).clamp(-1.0, 1.0)
        codes.append(_codes(normed, mids, power, signed, table).reshape(rows, -1))
        amaxes.append(amax.reshape(rows, -1))
    if len(codes) == 1:
        return codes[0], amaxes[0]
    return torch.cat(codes, dim=1), torch.cat(amaxes, dim=1)


class FusedCodecKernel:
    """One compiled decode + ``fn`` + encode for a rule's elementwise update.

    ``fn(param, grad, *moments, scalars) -> (param, *moments)`` (fp32 tensors of the parameter's
    local 2-D shape, ``scalars`` a 1-D fp32 tensor, so no step value is baked into the graph);
    ``unsigned[i]`` says moment i is stored as ``sqrt`` with the unsigned map (``non_negative``)."""

    def __init__(self, fn: Callable, unsigned: tuple[bool, ...], kind: str, block_size: int, c_source: str = ""):
        from slimtrain.registry.quant8 import _POWER

        self.fn, self.unsigned, self.kind, self.block_size = fn, tuple(unsigned), kind, block_size
        self.c_source, self._cpu = c_source, None
        self.power = _POWER[kind]
        #: per moment: codebook, midpoints (and the code table where the map has one)
        self.width = 4 if all(code_table(kind, not u) is not None for u in self.unsigned) else 2
        self._compiled = None

    def eager(self, param, grad, codes_scales, scalars, tables):
        """The graph ``torch.compile`` compiles (also runnable as is: the tests compare both)."""
        w = self.width
        moments = []
        for i, uns in enumerate(self.unsigned):
            cb = tables[w * i]
            moments.append(_decode(codes_scales[2 * i], codes_scales[2 * i + 1], cb, self.block_size, square=uns))
        out = self.fn(param, grad, *moments, scalars)
        new_param, new_moments = out[0], out[1:]
        encoded = []
        for i, uns in enumerate(self.unsigned):
            table = tuple(tables[w * i + 2: w * i + 4]) if w == 4 else None
            c, s = _encode(new_moments[i], tables[w * i + 1], self.block_size, self.power, not uns, uns, table)
            encoded += [c, s]
        return (new_param, *encoded)

    def in_place(self, param, grad, codes_scales, scalars, tables) -> None:
        """``eager`` written into its inputs: compiled, the writes land in the parameter's, codes' and
        scales' own storage, so the kernel allocates no new parameter-sized output."""
        _write(param, codes_scales, self.eager(param, grad, codes_scales, scalars, tables))

    def _get(self):
        if MODE == "eager":
            return self.in_place
        if self._compiled is None:
            self._compiled = torch.compile(self.in_place, dynamic=False, fullgraph=True)
            # one compile worker: a pool of them only contends on a small, shared CPU
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
        return self._compiled

    def _tables(self, device):
        cache = self.__dict__.setdefault("_table_cache", {})
        if str(device) not in cache:  # once per device: no host-to-device copies per step
            cache[str(device)] = self._make_tables(device)
        return cache[str(device)]

    def _make_tables(self, device):
        tables = []
        for uns in self.unsigned:
            cb = codebook(self.kind, not uns, device)
            tables += [cb, (cb[1:] + cb[:-1]) * 0.5]
            if self.width == 4:
                tables += list(code_table(self.kind, not uns, device))
        return tables

    def _use_c(self, p2, g2, cs) -> bool:
        """The hand-written CPU loop (``quant8_cpu``): compiled mode, a rule that gives its update in
        C, a map with a code table, a block that fits the loop's stack buffer, CPU tensors."""
        if MODE != "compile" or not self.c_source or self.width != 4 or self.block_size > 16384:
            return False
        from slimtrain.registry.quant8_cpu import CpuFusedKernel

        return CpuFusedKernel.accepts(p2, g2, cs)

    def step_eager(self, param, grad, codes_scales, scalars) -> None:
        """The same step, not compiled (the step during which compiling failed)."""
        p2, g2, cs = _as_rows(param, grad, codes_scales)
        _write(p2, cs, self.eager(p2, g2, cs, scalars, self._tables(param.device)))

    def __call__(self, param: torch.Tensor, grad: torch.Tensor, codes_scales: list[torch.Tensor],
                 scalars: torch.Tensor) -> bool:
        """Step in place (param, codes, scales: local 2-D tensors); False when fusion is off or failed
        (nothing was written: the caller steps unfused; a compile error is raised before the kernel runs)."""
        if _state["off"]:
            return False
        tables = self._tables(param.device)
        p2, g2, cs = _as_rows(param, grad, codes_scales)
        if self._use_c(p2, g2, cs):
            try:
                if self._cpu is None:
                    from slimtrain.registry.quant8_cpu import CpuFusedKernel

                    w = self.width
                    per_moment = [(tables[w * i], tables[w * i + 2], tables[w * i + 3]) for i in range(len(self.unsigned))]
                    self._cpu = CpuFusedKernel(self.c_source, self.unsigned, self.block_size, per_moment)
            except Exception as exc:  # noqa: BLE001  (no compiler, a failed build)
                disable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
                return False
            self._cpu(p2, g2, cs, scalars)
            return True
        try:
            import torch._dynamo

            with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
                self._get()(p2, g2, cs, scalars, tables)
        except Exception as exc:  # noqa: BLE001  (a missing compiler surfaces as any of several types)
            disable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200])
            return False
        return True


def _as_rows(param, grad, codes_scales):
    last = param.shape[-1]
    return param.view(-1, last), grad.reshape(-1, last), [t.view(-1, t.shape[-1]) for t in codes_scales]


def _write(p2, cs, out) -> None:
    p2.copy_(out[0])
    for dst, src in zip(cs, out[1:]):
        dst.copy_(src)
