"""Benchmark: what the composed optimizer costs per step, on the host and in total.

1. Host-side cost per projected parameter (default), described below. ``--baseline FILE`` adds
   GaLore/Fira stepped by an older, pre-composition ``projected_adamw.py`` (e.g.
   ``git show 4b8fb68:plugins/projected_adamw.py > /tmp/old_projected_adamw.py``), alternated with the
   current code in the same process, so a machine-speed drift hits both alike.
2. ``--adamw-shapes 60m,1b``: an AdamW-only recipe (the composed optimizer, every parameter on the
   default AdamW rule) against ``torch.optim.AdamW(foreach=True)`` on the parameter shapes of the
   LLaMA flavors (``--layers-1b`` of the 1B model's 24 layers, to fit a small machine's memory), fp32,
   both optimizers stepping the same parameters, alternated round by round; median step time.

The GaLore/Fira step-time goal is at 1B on a GPU, where the projection products are a fraction of a
percent of the training step (docs/benchmarks/optimizer_step_cpu.md) and what can still cost time is
per-parameter work on the host: Python, dispatch, kernel launches. This script isolates that part:
168 parameters (LLaMA-1B's count) of a tiny shape, so that the arithmetic is negligible and the time
of ``optimizer.step()`` is the per-parameter overhead, for torch's AdamW (foreach and for-loop),
``ProjectedAdamW``'s plain-AdamW path, GaLore and Fira (steady state: no projection refresh inside the
timed steps).

    .venv/bin/python benchmarks/optimizer_overhead.py [--steps 200] [--device cpu] [--baseline FILE]
    .venv/bin/python benchmarks/optimizer_overhead.py --adamw-shapes 60m,1b [--rounds 7] [--adamw-steps 3]

The figure is an upper bound on what the step adds on a GPU host only if the GPU work is shorter;
on a GPU, kernel launches are asynchronous and overlap with the host's Python.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimtrain.plugins.galore.projected_adamw import ProjectedAdamW  # noqa: E402

N_PARAMS = 168  # LLaMA-1B: 24 layers x (wq, wk, wv, wo, w1, w2, w3)
SHAPE = (16, 32)
RANK = 4

#: LLaMA flavors' dimensions (dim, ffn, layers, vocab, heads), as titan_integration/flavors.py has them
FLAVORS = {"60m": (512, 1376, 8, 32000, 8), "1b": (2048, 5461, 24, 32000, 32)}


def make_params(device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*SHAPE, generator=gen).to(device)) for _ in range(N_PARAMS)]


def optimizers(device, baseline=None):
    """(label, factory) pairs; each factory builds its optimizer over fresh parameters."""
    proj = dict(proj_rank=RANK, proj_gap=10**9, proj_scale=0.25)

    def torch_adamw(foreach):
        def build():
            params = make_params(device)
            return params, torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
        return build

    def projected(options, cls=ProjectedAdamW):
        def build():
            params = make_params(device)
            return params, cls([{"params": params, **options}], lr=1e-3, foreach=True)
        return build

    def composed(method, sections):
        """A ComposedOptimizer (the trainer's) with ``method``'s rule on every parameter."""
        def build():
            from slimtrain.registry import OptimizerHyper, compose

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

    out = [
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
    if baseline is not None:
        out += [
            ("GaLore, baseline (pre-composition ProjectedAdamW)", projected(proj, baseline)),
            ("Fira, baseline (pre-composition ProjectedAdamW)", projected({**proj, "fira": True}, baseline)),
        ]
    return out


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


def load_baseline(path: str):
    """``ProjectedAdamW`` from an older file, imported under another module name."""
    spec = importlib.util.spec_from_file_location("baseline_projected_adamw", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ProjectedAdamW


def overhead(args) -> None:
    device = torch.device(args.device)
    baseline = load_baseline(args.baseline) if args.baseline else None
    print(f"{N_PARAMS} parameters of {SHAPE[0]} x {SHAPE[1]}, rank {RANK}, {args.steps} steps, {device}, "
          f"torch {torch.__version__}, best of {args.repeats}, alternated")
    builds = optimizers(device, baseline)
    best = {label: float("inf") for label, _ in builds}
    for _ in range(args.repeats):  # alternate so a machine-speed drift hits every entry alike
        for label, build in builds:
            best[label] = min(best[label], time_steps(build, args.steps, device))
    print("| optimizer | step | per parameter |")
    print("|---|---|---|")
    for label, _ in builds:
        print(f"| {label} | {best[label] * 1e3:.2f} ms | {best[label] / N_PARAMS * 1e6:.0f} us |", flush=True)


def composed_adamw(params, names):
    """The composed optimizer as an AdamW-only recipe builds it: one group on the default rule."""
    from slimtrain.plugins.adamw import AdamWRule
    from slimtrain.registry import ParamSpec
    from slimtrain.registry.composed_optimizer import ComposedOptimizer

    specs = {p: ParamSpec(n, n.rpartition(".")[0], "weight", tuple(p.shape)) for p, n in zip(params, names)}
    return ComposedOptimizer([{"params": params, "rule": "adamw"}], rules={"adamw": AdamWRule("adamw", "foreach")},
                             specs=specs, lr=1e-3)


def adamw_shapes(args) -> None:
    from slimtrain.registry import llama_dense_specs

    print(f"AdamW-only: composed optimizer vs torch.optim.AdamW(foreach=True), fp32, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} rounds of "
          f"{args.adamw_steps} steps each, alternated; median step time")
    print("| shapes | parameters | elements | torch AdamW foreach | composed (AdamW rule) | composed / torch |")
    print("|---|---|---|---|---|---|")
    for flavor in args.adamw_shapes.split(","):
        dim, ffn, layers, vocab, heads = FLAVORS[flavor]
        if flavor == "1b":
            layers = args.layers_1b
        specs = llama_dense_specs(dim, ffn, layers, vocab, heads)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.empty(s.shape).normal_(generator=gen)) for s in specs]
        for p in params:
            p.grad = torch.empty_like(p).normal_(generator=gen)
        ref = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        ours = composed_adamw(params, [s.name for s in specs])
        for opt in (ref, ours):
            opt.step()  # state creation outside the timing
        times = {"torch": [], "composed": []}
        for r in range(args.rounds):
            order = (("torch", ref), ("composed", ours)) if r % 2 == 0 else (("composed", ours), ("torch", ref))
            for label, opt in order:
                start = time.perf_counter()
                for _ in range(args.adamw_steps):
                    opt.step()
                times[label].append((time.perf_counter() - start) / args.adamw_steps)
        t, c = statistics.median(times["torch"]), statistics.median(times["composed"])
        label = flavor if flavor != "1b" else f"1b ({layers} of 24 layers)"
        n = sum(p.numel() for p in params)
        print(f"| {label} | {len(params)} | {n / 1e6:.0f}M | {t * 1e3:.1f} ms | {c * 1e3:.1f} ms | {c / t:.3f} |",
              flush=True)
        del ref, ours, params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--baseline", default=None, help="an older projected_adamw.py to compare GaLore/Fira with")
    ap.add_argument("--adamw-shapes", default=None, help="e.g. 60m,1b: the AdamW-only comparison instead")
    ap.add_argument("--layers-1b", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--adamw-steps", type=int, default=3)
    args = ap.parse_args()
    if args.adamw_shapes:
        adamw_shapes(args)
    else:
        overhead(args)


if __name__ == "__main__":
    main()
