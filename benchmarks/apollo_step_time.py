"""Benchmark: APOLLO and APOLLO-Mini optimizer steps against apollo-torch 1.0.3's, interleaved.

One LLaMA block's seven projection matrices (60m: dim 512, FFN 1376; 1b: dim 2048, FFN 5461), fixed
gradients, CPU, 1 thread. Both optimizers are built once; steps alternate ours / the package's in
one process (round-robin, so a shared machine's load falls on both), no refresh inside the timed
steps (gap 10^9 after the first step). Reported: median step time of each, and the ratio
ours / package (<= 1.0: at least as fast).

    .venv/bin/python benchmarks/apollo_step_time.py [--steps 20] [--flavors 60m,1b] [--no-write] [--profile]

Writes docs/benchmarks/apollo_step_time.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimtrain.registry import OptimizerHyper, compose  # noqa: E402
from tests.methods.test_frontier_reference import load_apollo_torch  # noqa: E402

DATE = "2026-12-06"
DEVICE = "2-core CPU, torch 2.13.0+cpu, 1 thread"
KEEP_MARKER = "<!-- written by hand below this line; benchmarks/apollo_step_time.py keeps it -->"
FLAVORS = {"60m": (512, 1376, 128), "1b": (2048, 5461, 512)}  # dim, FFN, APOLLO rank (the recipes' scripts)
CASES = {  # method: (section options, package group options)
    "apollo": (dict(scale=1.0), dict(scale=1.0, scale_type="channel")),
    "apollo_mini": (dict(rank=1, scale=128.0), dict(rank=1, scale=128.0, scale_type="tensor")),
}


class Block(nn.Module):
    """The seven projections of one LLaMA block, named as the default targets select them."""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.attention = nn.Module()
        for n in ("wq", "wk", "wv", "wo"):
            setattr(self.attention, n, nn.Linear(dim, dim, bias=False))
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(dim, ffn, bias=False)
        self.feed_forward.w3 = nn.Linear(dim, ffn, bias=False)
        self.feed_forward.w2 = nn.Linear(ffn, dim, bias=False)


def build(method: str, flavor: str):
    dim, ffn, rank = FLAVORS[flavor]
    ours_opts, pkg_opts = CASES[method]
    hyper = OptimizerHyper(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
    torch.manual_seed(0)
    mine, theirs = Block(dim, ffn), Block(dim, ffn)
    theirs.load_state_dict(mine.state_dict())
    section = {"rank": rank, "update_proj_gap": 10**9, **ours_opts}
    comp = compose([method], {method: section})
    our_opt = comp.build_optimizer(comp.param_groups(mine), hyper)
    reference_cls, _ = load_apollo_torch()
    group = {"params": list(theirs.parameters()), "rank": rank, "update_proj_gap": 10**9, "proj": "random",
             "proj_type": "std", **pkg_opts}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pkg_opt = reference_cls([group], lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in mine.parameters()]
    for model in (mine, theirs):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
    return our_opt, pkg_opt


def measure(method: str, flavor: str, steps: int) -> dict:
    ours, pkg = build(method, flavor)
    ours.step()  # the first step draws the projections; not timed
    pkg.step()
    t_ours, t_pkg = [], []
    for _ in range(steps):
        for opt, out in ((ours, t_ours), (pkg, t_pkg)):
            t = time.perf_counter()
            opt.step()
            out.append(time.perf_counter() - t)
    o, p = statistics.median(t_ours), statistics.median(t_pkg)
    print(f"{method} {flavor}: ours {o * 1e3:.1f} ms, apollo-torch {p * 1e3:.1f} ms, ratio {o / p:.2f}", flush=True)
    return dict(method=method, flavor=flavor, ours=o, pkg=p)


def profile(method: str, flavor: str) -> None:
    ours, _ = build(method, flavor)
    ours.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            ours.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def render(rows: list[dict], steps: int) -> str:
    lines = [
        "# APOLLO and APOLLO-Mini optimizer step vs apollo-torch 1.0.3 (issue 26)",
        "",
        f"Run {DATE}, {DEVICE}; `benchmarks/apollo_step_time.py --steps {steps}`. One LLaMA block's seven "
        "projections (60m: 512 / 1376, rank 128; 1b: 2048 / 5461, rank 512; APOLLO-Mini rank 1, tensor "
        "scale), fixed gradients, steps interleaved ours / package in one process, median of each; no "
        "projection refresh in the timed steps. Goal: ratio <= 1.00.",
        "",
        "| method | block | ours | apollo-torch | ours / package |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['flavor']} | {r['ours'] * 1e3:.1f} ms | {r['pkg'] * 1e3:.1f} ms | {r['ours'] / r['pkg']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--flavors", default="60m,1b")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.profile:
        for method in CASES:
            profile(method, args.flavors.split(",")[0])
        return
    rows = [measure(m, f, args.steps) for f in args.flavors.split(",") for m in CASES]
    text = render(rows, args.steps)
    print(text)
    if not args.no_write:
        out = ROOT / "docs" / "benchmarks" / "apollo_step_time.md"
        kept = out.read_text().split(KEEP_MARKER, 1) if out.exists() else []
        out.write_text(text + "\n" + KEEP_MARKER + (kept[1] if len(kept) == 2 else "\n"))


if __name__ == "__main__":
    main()
