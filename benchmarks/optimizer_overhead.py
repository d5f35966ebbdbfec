"""Benchmark: host-side cost of one optimizer step over LLaMA-1B's 168 projected matrices.

The GaLore/Fira step-time goal is at 1B on a GPU, where the projection products are a fraction of a
percent of the training step (docs/benchmarks/optimizer_step_cpu.md) and what can still cost time is
per-parameter work on the host: Python, dispatch, kernel launches. This script isolates that part:
168 parameters (LLaMA-1B's count) of a tiny shape, so that the arithmetic is negligible and the time
of ``optimizer.step()`` is the per-parameter overhead, for torch's AdamW (foreach and for-loop),
``ProjectedAdamW``'s plain-AdamW path, GaLore and Fira (steady state: no projection refresh inside the
timed steps).

    .venv/bin/python benchmarks/optimizer_overhead.py [--steps 200] [--device cpu]

The figure is an upper bound on what the step adds on a GPU host only if the GPU work is shorter;
on a GPU, kernel launches are asynchronous and overlap with the host's Python.
"""

from __future__ import annotations

import argparse
import time

import torch

from plugins.galore.projected_adamw import ProjectedAdamW

N_PARAMS = 168  # LLaMA-1B: 24 layers x (wq, wk, wv, wo, w1, w2, w3)
SHAPE = (16, 32)
RANK = 4


def make_params(device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*SHAPE, generator=gen).to(device)) for _ in range(N_PARAMS)]


def optimizers(device):
    """(label, factory) pairs; each factory builds its optimizer over fresh parameters."""
    proj = dict(proj_rank=RANK, proj_gap=10**9, proj_scale=0.25)

    def torch_adamw(foreach):
        def build():
            params = make_params(device)
            return params, torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
        return build

    def projected(options):
        def build():
            params = make_params(device)
            return params, ProjectedAdamW([{"params": params, **options}], lr=1e-3, foreach=True)
        return build

    def composed(method, sections):
        """A ComposedOptimizer (the trainer's) with ``method``'s rule on every parameter."""
        def build():
            from registry import OptimizerHyper, compose

            params = make_params(device)
            model = torch.nn.Module()
            model.layers = torch.nn.ModuleList()
            for p in params:
                lin = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False, device=device)
                lin.weight = p
                block = torch.nn.Module()
                block.wq = lin
                model.layers.append(block)
            comp = compose([method] if method else [], sections)
            return params, comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-3))
        return build

    return [
        ("ComposedOptimizer, AdamW rule", composed(None, {})),
        ("ComposedOptimizer, GaLore rule", composed("galore", {"galore": {"rank": RANK, "update_proj_gap": 10**9}})),
        ("ComposedOptimizer, APOLLO rule", composed("apollo", {"apollo": {"rank": RANK, "update_proj_gap": 10**9}})),
        ("ComposedOptimizer, APOLLO-Mini rule", composed("apollo_mini", {"apollo_mini": {"update_proj_gap": 10**9}})),
        ("ComposedOptimizer, Muon rule (fp32 NS)", composed("muon", {"muon": {"ns_dtype": "float32"}})),
        ("ComposedOptimizer, SCALE rule", composed("scale", {"scale": {}})),
        ("torch AdamW, foreach", torch_adamw(True)),
        ("torch AdamW, for-loop", torch_adamw(False)),
        ("ProjectedAdamW, plain groups (foreach)", projected({})),
        ("GaLore (ProjectedAdamW, projected)", projected(proj)),
        ("Fira (ProjectedAdamW, projected + residual)", projected({**proj, "fira": True})),
    ]


def time_steps(build, steps: int, device) -> float:
    params, opt = build()
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(*SHAPE, generator=gen).to(device) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g
    for _ in range(5):  # state creation and the first (refresh) step stay out of the timing
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"{N_PARAMS} parameters of {SHAPE[0]} x {SHAPE[1]}, rank {RANK}, {args.steps} steps, {device}")
    print("| optimizer | step | per parameter |")
    print("|---|---|---|")
    for label, build in optimizers(device):
        best = min(time_steps(build, args.steps, device) for _ in range(3))
        print(f"| {label} | {best * 1e3:.2f} ms | {best / N_PARAMS * 1e6:.0f} us |", flush=True)


if __name__ == "__main__":
    main()
