"""Step time of 8-bit optimizer state and per-layer updates vs the same recipe without them (CPU).

One training step = forward + backward + optimizer step of the flavor's torchtitan LLaMA in fp32 on
``--batch x --seq-len`` random tokens; median of ``--steps`` steps after 2 warm-up steps. The
recipe is GaLore (rank 128 at both flavors, refresh every 200 steps, so the timed steps do no
refresh) or plain AdamW. ``python benchmarks/memory_layers_step_time.py --flavor tiny``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from titan_integration.flavors import FLAVORS, build_model


def build(flavor: str, methods: list[str], sections: dict):
    from plugins.per_layer_updates import PerLayerStepper
    from plugins.state_8bit import install_codec
    from registry import OptimizerHyper, compose

    comp = compose(methods, sections)
    torch.manual_seed(0)
    model = build_model(flavor)
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-3))
    if "state_8bit" in methods:
        install_codec(opt, comp.method("state_8bit").codec())
    if "per_layer_updates" in methods:
        PerLayerStepper(opt)
    return model, opt


def one_step(model, opt, tokens) -> float:
    t0 = time.perf_counter()
    out = model(tokens)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t0


def time_round_robin(built: dict, tokens, steps: int) -> dict[str, float]:
    """Median step time per variant, the variants' steps interleaved (one step of each per round,
    2 warm-up rounds): on a shared machine a change of load then hits every variant alike, where
    timing the variants one after another compared their loads as much as their costs."""
    times: dict[str, list[float]] = {name: [] for name in built}
    for i in range(steps + 2):
        for name, (model, opt) in built.items():
            t = one_step(model, opt, tokens)
            if i >= 2:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on shared cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = FLAVORS[args.flavor].vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    galore = {"galore": {"rank": 128, "update_proj_gap": 200}}
    variants = [
        ("adamw", ["adamw"], {}),
        ("adamw + state_8bit", ["adamw", "state_8bit"], {}),
        ("adamw + per_layer_updates", ["adamw", "per_layer_updates"], {}),
        ("galore", ["galore"], galore),
        ("galore + state_8bit", ["galore", "state_8bit"], galore),
        ("galore + per_layer_updates", ["galore", "per_layer_updates"], galore),
        ("galore + state_8bit + per_layer_updates", ["galore", "state_8bit", "per_layer_updates"], galore),
    ]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, CPU {platform.machine()} "
          f"({args.threads} thread(s), shared machine: load average before {os.getloadavg()[0]:.1f}), torch "
          f"{torch.__version__}, flavor {args.flavor}, batch {args.batch} x {args.seq_len}, median of {args.steps} "
          f"interleaved steps")
    built = {name: build(args.flavor, methods, sections) for name, methods, sections in variants}
    medians = time_round_robin(built, tokens, args.steps)
    print("| recipe | step s | vs without |")
    print("|---|---|---|")
    base = {}
    for name, t in medians.items():
        root = name.split(" + ")[0]
        base.setdefault(root, t)
        print(f"| {name} | {t:.3f} | {t / base[root]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
