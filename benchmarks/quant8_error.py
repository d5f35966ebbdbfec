"""Round-trip error of the 8-bit maps on Adam-moment-like data (which map state_8bit uses).

Data: 200 steps of Adam moments (beta 0.9 / 0.999) on gradients whose per-row scale spans three
decades (as weight matrices' rows do) with rare 10x outliers. Reported: the mean relative error of
the Adam direction m / (sqrt(v) + eps) when both moments are stored quantized, and each moment's
mean relative error. ``python benchmarks/quant8_error.py``
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from slimtrain.registry.quant8 import MAPS, dequantize, quantize


def moments(rows: int, cols: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    row_scale = 10 ** (-3 * torch.rand(rows, 1, generator=g))
    m = torch.zeros(rows, cols)
    v = torch.zeros(rows, cols)
    for _ in range(steps):
        grad = torch.randn(rows, cols, generator=g) * row_scale
        outlier = torch.rand(rows, cols, generator=g) < 1e-3
        grad = torch.where(outlier, grad * 10, grad)
        m.mul_(0.9).add_(grad, alpha=0.1)
        v.mul_(0.999).addcmul_(grad, grad, value=0.001)
    return m, v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args()
    m, v = moments(args.rows, args.cols, args.steps, 0)
    eps = 1e-8
    ref = m / (v.sqrt() + eps)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.rows}x{args.cols}, block {args.block_size}")
    print("| map | m rel. err | v rel. err | m/(sqrt v + eps) rel. err |")
    print("|---|---|---|---|")
    for kind in MAPS:
        kw = dict(kind=kind, block_size=args.block_size)
        mq = dequantize(*quantize(m, signed=True, **kw), signed=True, **kw)
        vq = dequantize(*quantize(v, signed=False, **kw), signed=False, **kw)
        upd = mq / (vq.sqrt() + eps)
        print(f"| {kind}, v stored | {rel(mq, m):.4f} | {rel(vq, v):.4f} | {rel(upd, ref):.4f} |")
        vs = dequantize(*quantize(v.sqrt(), signed=False, **kw), signed=False, **kw) ** 2
        upd = mq / (vs.sqrt() + eps)
        print(f"| {kind}, sqrt(v) stored | {rel(mq, m):.4f} | {rel(vs, v):.4f} | {rel(upd, ref):.4f} |")


if __name__ == "__main__":
    main()
