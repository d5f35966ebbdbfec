"""Peak memory and step time (forward + backward) of one parametrized layer against a dense Linear.

Shapes: the paper's 60M (d 512, FFN 1376, rank 128) and 1B (d 2048, FFN 5461, rank 512) matrices:
attention (d x d) and the two FFN orientations. Methods: dense ``nn.Linear``, ``low_rank`` (x A^T B^T),
``lora`` (x W0^T + s x A^T B^T), ``sltrain`` (delta 0.03, W rebuilt in backward).

Each case runs in a fresh process. Peak memory is the peak of live tensor bytes during one
forward + backward step, everything included (weights and buffers, the input x and the output
gradient, activations, temporaries such as a rebuilt W, gradients): on CPU counted exactly with
torch's MemTracker (a dispatch mode; the timed steps run without it), on CUDA max_memory_allocated.
"Saved" is what autograd keeps between forward and backward (the part that grows with depth).

    python benchmarks/parametrized_layers.py                    # CPU, writes docs/benchmarks/parametrized_layers.md
    python benchmarks/parametrized_layers.py --device cuda --dtype bfloat16 --tokens 8192 --out -
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "60M": dict(d=512, f=1376, rank=128, alpha=32.0),
    "1B": dict(d=2048, f=5461, rank=512, alpha=8.0),
    "nano": dict(d=32, f=86, rank=8, alpha=32.0),  # smoke runs only (gpu_check --cpu-smoke)
}
METHODS = ("dense", "low_rank", "lora", "sltrain")


LAYER_KEYS = ("attn_wq", "ffn_w1", "ffn_w2")


def shapes(size: str, layers: list[str] | None = None) -> list[tuple[str, int, int]]:
    d, f = SIZES[size]["d"], SIZES[size]["f"]
    every = [("attn wq", d, d), ("ffn w1", f, d), ("ffn w2", d, f)]
    return every if layers is None else [s for s in every if s[0].replace(" ", "_") in layers]


def run_case(size: str, m: int, n: int, method: str, tokens: int, reps: int, device: str, dtype_name: str) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    from slimtrain.registry import compose
    from slimtrain.registry.parametrization import attach, originals

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    linear = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
    if method != "dense":
        cfg = {"rank": SIZES[size]["rank"], "alpha": SIZES[size]["alpha"]}
        if method == "sltrain":
            cfg["delta"] = 0.03
        meth = compose([method], {method: cfg}).method(method)
        p = meth.make_parametrization(linear, "layer")
        attach(linear, p)
        with torch.no_grad():
            p.initialize(originals(linear), "layer")
            if "B" in originals(linear):  # train-like state: B non-zero
                originals(linear)["B"].normal_(0, 0.02)
    params = [q for q in linear.parameters() if q.requires_grad]
    param_bytes = sum(q.numel() * q.element_size() for q in linear.parameters()) + sum(
        b.numel() * b.element_size() for b in linear.buffers()
    )
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(tokens, m, device=device, dtype=dtype)
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        y = linear(x)
        y.backward(gy)
        for q in params:
            q.grad = None
        x.grad = None

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        y = linear(x)
    saved_bytes = sum(saved)
    del y
    step()  # warm-up
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated()
    else:
        # Exact live-tensor accounting (a dispatch mode; the timed steps below run without it).
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(*linear.parameters(), *linear.buffers(), x, gy)  # tensors: W0 is frozen
        try:
            with tracker:
                step()
            peak = tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"]
        except RuntimeError:  # MemTracker hooks every parameter and refuses frozen ones (LoRA's W0)
            peak = None
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return dict(time_ms=1e3 * statistics.median(times), peak_bytes=peak, saved_bytes=saved_bytes, param_bytes=param_bytes)


def fmt(value, divisor) -> str:
    return "n/a" if value is None or divisor is None else f"{value / divisor:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per step (default: 4096 at 60M, 1024 at 1B on CPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="60M,1B")
    ap.add_argument("--layers", default=None,
                    help="comma list of the layers to run, of " + ", ".join(LAYER_KEYS) + " (default: all; "
                    "gpu_check's CPU smoke runs one: each case is a fresh process, ~3 s on CPU)")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/parametrized_layers.md"), help="markdown file, or - for stdout")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        size, m, n, method, tokens = args.case.split(",")
        print(json.dumps(run_case(size, int(m), int(n), method, int(tokens), args.reps, args.device, args.dtype)))
        return

    layers = None
    if args.layers:
        layers = [x.strip() for x in args.layers.split(",") if x.strip()]
        bad = [x for x in layers if x not in LAYER_KEYS]
        if bad or not layers:
            ap.error(f"--layers {args.layers!r}: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(LAYER_KEYS)}")

    import torch

    rows = []
    for size in args.sizes.split(","):
        tokens = args.tokens or (4096 if size == "60M" else 1024)
        for label, m, n in shapes(size, layers):
            results = {}
            for method in METHODS:
                cmd = [sys.executable, __file__, "--case", f"{size},{m},{n},{method},{tokens}", "--reps", str(args.reps),
                       "--device", args.device, "--dtype", args.dtype]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                results[method] = json.loads(out)
                r = results[method]
                print(f"{size} {label} {m}x{n} {method:9s} {r['time_ms']:9.1f} ms  peak {fmt(r['peak_bytes'], 2**20)} MiB  "
                      f"saved {r['saved_bytes']/2**20:7.1f} MiB", file=sys.stderr)
            rows.append((size, label, m, n, tokens, results))

    if args.device == "cpu":
        device = f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}); no GPU in this session"
    else:
        device = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    lines = [
        "# Parametrized layers: step time and memory against a dense Linear",
        "",
        f"Date: {datetime.date.today().isoformat()}. Device: {device}. dtype {args.dtype}, median of {args.reps} "
        f"forward+backward steps after one warm-up; x requires grad; B set non-zero (trained state).",
        "Produced by `python benchmarks/parametrized_layers.py` (see its docstring for what is measured). "
        "Ratios are against dense at the same shape; peak = peak live tensor bytes of one step, all included "
        "(weights, x, output gradient, activations, temporaries, gradients; MemTracker on CPU); "
        "saved = what autograd keeps for backward (the part that accumulates across layers in a model).",
        "",
        "| size | layer | m x n | tokens | method | time ms | x dense | peak MiB | x dense | saved MiB | params+buffers MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, label, m, n, tokens, results in rows:
        d = results["dense"]
        for method in METHODS:
            r = results[method]
            lines.append(
                f"| {size} | {label} | {m} x {n} | {tokens} | {method} | {r['time_ms']:.1f} | {r['time_ms']/d['time_ms']:.2f} | "
                f"{fmt(r['peak_bytes'], 2**20)} | {fmt(r['peak_bytes'], d['peak_bytes'])} | {r['saved_bytes']/2**20:.1f} | "
                f"{r['param_bytes']/2**20:.1f} |"
            )
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        print(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
