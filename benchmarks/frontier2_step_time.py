"""Benchmark: the optimizer step of SinkGD, Stable-SPAM and Adam-mini against AdamW at a flavor's
parameter shapes (default 60m), on the host (CPU), interleaved in one process.

Every recipe's composed optimizer (``compose([...]).build_optimizer``) steps its own copy of the
same LLaMA parameters (built by name as torchtitan names them: embedding, per layer wq..w3 and two
norms, final norm, output head) with the same fixed gradients; fp32; rounds alternate the order of
the optimizers so a machine-speed drift hits all alike; the figure is the median step time and its
ratio to the composed AdamW (every parameter on the default AdamW rule, torch's foreach kernel).
Issue 24's goal: each within 1.5x of AdamW's step.

    .venv/bin/python benchmarks/frontier2_step_time.py [--flavor 60m] [--rounds 7] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimtrain.registry import OptimizerHyper, compose, llama_dense_specs  # noqa: E402

FLAVORS = {"60m": (512, 1376, 8, 32000, 8), "tiny": (256, 688, 4, 4096, 4), "1b": (2048, 5461, 24, 32000, 32)}
RECIPES = {
    "adamw": (["adamw"], {}),
    "sinkgd": (["sinkgd"], {}),
    "stable_spam": (["stable_spam"], {"stable_spam": {"total_T": 10000}}),
    "adam_mini": (["adam_mini"], {"adam_mini": {"head_dim": 64}}),
}


def llama_like(dim, ffn, layers, vocab, heads) -> nn.Module:
    """An nn.Module with torchtitan's LLaMA parameter names and module kinds (no forward)."""
    root = nn.Module()
    with torch.device("meta"):
        for spec in llama_dense_specs(dim, ffn, layers, vocab, heads):
            *parents, leaf = spec.module.split(".")
            mod = root
            for part in parents:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            if spec.is_linear:
                out_f, in_f = spec.shape
                mod.add_module(leaf, nn.Linear(in_f, out_f, bias=False))
            elif len(spec.shape) == 2:
                mod.add_module(leaf, nn.Embedding(*spec.shape))
            else:
                mod.add_module(leaf, nn.RMSNorm(spec.shape[0]))
    return root.to_empty(device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", default="60m", choices=list(FLAVORS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    args = ap.parse_args()
    names = args.recipes.split(",")
    shape = FLAVORS[args.flavor]
    gen = torch.Generator().manual_seed(0)
    template = llama_like(*shape)
    with torch.no_grad():
        for p in template.parameters():
            p.normal_(generator=gen).mul_(0.02)
    grads = {n: torch.empty_like(p).normal_(generator=gen) for n, p in template.named_parameters()}
    opts = {}
    for name in names:
        model = llama_like(*shape)
        model.load_state_dict(template.state_dict())
        for n, p in model.named_parameters():
            p.grad = grads[n]  # shared, read-only for every rule
        comp = compose(*RECIPES[name])
        opts[name] = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-3))
        opts[name].step()  # state creation outside the timing
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                opts[name].step()
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names), flush=True)
    n_params = sum(p.numel() for p in template.parameters())
    print(f"optimizer step at {args.flavor} shapes ({n_params / 1e6:.0f}M parameters, "
          f"{len(grads)} tensors), fp32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} rounds of {args.steps} steps, order rotated each round; median")
    print("| recipe | step (ms) | / AdamW |")
    print("|---|---|---|")
    base = statistics.median(times["adamw"]) if "adamw" in times else None
    for name in names:
        t = statistics.median(times[name])
        ratio = f"{t / base:.2f}" if base else "-"
        print(f"| {name} | {t * 1e3:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
