"""Benchmark: Muon's Newton-Schulz cost at LLaMA-1B shapes on CPU, and its FLOP share of a 1B step.

Times ``slimtrain.plugins.muon.newton_schulz`` (5 quintic iterations, the recipe's setting) on the two 1B
matrix shapes, 2048 x 2048 (wq, wk, wv, wo) and 2048 x 5461 (w1, w3; w2 is its transpose), in fp32
and bf16, and counts its FLOPs: per iteration on the wide orientation X (a x b, a <= b) the Gram
matrix X X^T (2 a^2 b), the polynomial's G G (2 a^3) and the update P X (2 a^2 b). The share is
against the training FLOPs of one 1B step (6 N tokens, N = 1.34e9 weights, 512 x 256 tokens: the
paper's batch), for Muon on the 168 hidden matrices.

    .venv/bin/python benchmarks/newton_schulz_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from slimtrain.plugins.muon import newton_schulz

D, F, LAYERS = 2048, 5461, 24
N_WEIGHTS = 1_339_113_472  # slimtrain memory --flavor 1b
TOKENS_PER_STEP = 512 * 256
STEPS = 5


def ns_flops(m: int, n: int, steps: int = STEPS) -> int:
    a, b = min(m, n), max(m, n)
    return steps * (4 * a * a * b + 2 * a**3)


def time_ns(shape, dtype, repeats: int) -> float:
    g = torch.randn(shape)
    newton_schulz(g, STEPS, dtype=dtype)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        newton_schulz(g, STEPS, dtype=dtype)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    shapes = {"2048x2048": (D, D), "2048x5461": (D, F)}
    per_layer = {"2048x2048": 4, "2048x5461": 3}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        step_s = 0.0
        for label, shape in shapes.items():
            s = time_ns(shape, dtype, args.repeats)
            gflop = ns_flops(*shape) / 1e9
            print(f"{dtype_name} {label}: {s * 1e3:.0f} ms, {gflop:.1f} GFLOP, {gflop / s:.1f} GFLOP/s")
            step_s += LAYERS * per_layer[label] * s
        print(f"{dtype_name}: all 168 hidden matrices of 1B on this CPU: {step_s:.1f} s per step")
    total = LAYERS * (4 * ns_flops(D, D) + 3 * ns_flops(D, F))
    train = 6 * N_WEIGHTS * TOKENS_PER_STEP
    print(f"NS FLOPs per step {total / 1e12:.2f} TFLOP; training FLOPs per step {train / 1e12:.0f} TFLOP; "
          f"share {100 * total / train:.3f}%")


if __name__ == "__main__":
    main()
