"""Benchmark: the randomized refresh's defaults, speed against accuracy (power iterations x oversampling).

Accuracy: GaLore and Fira (paper convention, ``ProjectedAdamW``) on full-rank noisy gradients (a
drifting low-rank signal of the projection's rank, singular values 1 .. 0.1, plus Gaussian noise of
spectral norm ``noise``; tests/optim/noisy_gradients.py), a refresh every 5 steps, 30 steps: the
largest gap ``||W_t - W_t^svd|| / ||W_t^svd - W_0||`` to the exact-SVD trajectory, per setting. The
``fp64 SVD`` column is the same gap for an exact SVD of the fp64 gradient: the floor below which no
fp32 refresh can be told apart from the exact one.

Speed: one refresh at the LLaMA-1B shapes (rank 512), each setting and the full SVD timed
interleaved in one process (round-robin, minimum over rounds), 1 thread.

    .venv/bin/python benchmarks/galore_refresh_defaults.py [--rounds 2] [--no-write] [--skip-accuracy]

Writes its section of docs/benchmarks/galore_refresh.md (between the markers below) and the
accuracy rows to docs/benchmarks/galore_refresh_defaults.json (``--skip-accuracy`` re-times the
refreshes and keeps those rows: the accuracy part takes minutes, and it does not depend on load).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimtrain.plugins.galore.projected_adamw import ProjectedAdamW  # noqa: E402
from slimtrain.registry.sharded import RowShards  # noqa: E402
from slimtrain.registry.subspace import (  # noqa: E402
    DEFAULT_OVERSAMPLE,
    DEFAULT_POWER_ITERS,
    canonical_signs,
    randomized_range,
    std_side,
    svd_projection,
)
from tests.optim.noisy_gradients import drifting_noisy_gradients, max_relative_gap  # noqa: E402

DATE = "2026-12-06"
DEVICE = "2-core CPU, torch 2.13.0+cpu, 1 thread"
START, END = "<!-- galore_refresh_defaults.py: start -->", "<!-- galore_refresh_defaults.py: end -->"
SETTINGS = [(2, 0), (2, 8), (3, 0), (3, 8), (4, 8)]  # (power iterations, oversampling)
PERTURBATION = 1e-7  # relative, elementwise: about fp32 rounding of the gradient
CASES = [((96, 64), 8), ((64, 96), 8), ((256, 160), 32), ((160, 256), 32), ((384, 256), 128), ((256, 384), 128)]
NOISE = [0.02, 0.05, 0.08, 0.3]
SHAPES_1B = [(2048, 2048), (2048, 5461), (5461, 2048)]
COUNTS_1B = {(2048, 2048): 4 * 24, (5461, 2048): 2 * 24, (2048, 5461): 1 * 24}


class Fp64SvdRefresh(ProjectedAdamW):
    """The exact refresh computed from the fp64 gradient (the accuracy floor)."""

    def compute_projection(self, group, rows, side, seed):
        u, _, vh = torch.linalg.svd(rows.local.double(), full_matrices=False)
        r = group["proj_rank"]
        basis = canonical_signs(u[:, :r], 0) if side == "left" else canonical_signs(vh[:r], 1)
        return basis.float().contiguous()


def trajectory(shape, grads, rank, fira, cls=ProjectedAdamW, **options):
    w0 = 0.02 * torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    p = torch.nn.Parameter(w0.clone())
    group = {"params": [p], "proj_rank": rank, "proj_gap": 5, "proj_scale": 0.25, "fira": fira, **options}
    opt = cls([group], lr=0.01)
    out = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return w0, out


def perturb(grads: list[torch.Tensor], size: float = PERTURBATION) -> list[torch.Tensor]:
    """Each gradient times ``1 + size z`` elementwise (z standard normal; 1e-7: a change at the level
    of fp32 rounding), to show how well the exact SVD's own trajectory is defined."""
    gen = torch.Generator().manual_seed(11)
    return [g.double().mul(1 + size * torch.randn(g.shape, generator=gen, dtype=torch.float64)).float()
            for g in grads]


SWEEP = [1e-7, 1e-5, 1e-4, 1e-3, 1e-2]


def perturbation_sweep() -> None:
    """Markdown rows: GaLore, the default refresh's gap to the exact-SVD trajectory next to the exact
    SVD's own gap when every gradient entry is perturbed by a relative ``size`` (``--sweep``)."""
    print("| noise | shape | rank | default refresh | " + " | ".join(f"SVD, G(1+{d:.0e} z)" for d in SWEEP) + " |")
    print("|---|---|---|---|" + "---|" * len(SWEEP))
    for noise in (0.05, 0.3):
        for shape, rank in [((96, 64), 8), ((256, 160), 32), ((256, 384), 128)]:
            grads = drifting_noisy_gradients(shape, 30, signal_rank=rank, noise=noise, seed=2)
            w0, exact = trajectory(shape, grads, rank, False, proj_method="svd")
            _, default = trajectory(shape, grads, rank, False)
            cells = []
            for d in SWEEP:
                _, moved = trajectory(shape, perturb(grads, d), rank, False, proj_method="svd")
                cells.append(fmt(max_relative_gap(moved, exact, w0)))
            print(f"| {noise} | {shape[0]} x {shape[1]} | {rank} | {fmt(max_relative_gap(default, exact, w0))} | "
                  + " | ".join(cells) + " |", flush=True)


def accuracy() -> list[dict]:
    rows = []
    for noise in NOISE:
        for shape, rank in CASES:
            grads = drifting_noisy_gradients(shape, 30, signal_rank=rank, noise=noise, seed=2)
            for fira in (False, True):
                w0, exact = trajectory(shape, grads, rank, fira, proj_method="svd")
                _, fp64 = trajectory(shape, grads, rank, fira, cls=Fp64SvdRefresh, proj_method="svd")
                _, perturbed = trajectory(shape, perturb(grads), rank, fira, proj_method="svd")
                gaps = {}
                for q, o in SETTINGS:
                    _, approx = trajectory(
                        shape, grads, rank, fira, proj_method="randomized", proj_power_iters=q, proj_oversample=o
                    )
                    gaps[(q, o)] = max_relative_gap(approx, exact, w0)
                row = dict(noise=noise, shape=shape, rank=rank, method="fira" if fira else "galore",
                           fp64=max_relative_gap(fp64, exact, w0),
                           perturbed=max_relative_gap(perturbed, exact, w0), gaps=gaps)
                rows.append(row)
                print(row, flush=True)
    return rows


def speed(rounds: int) -> dict:
    """CPU time (``time.process_time``, one thread) of each refresh, minimum over rounds: on a
    shared, loaded machine wall-clock time mostly measures the other jobs (the full SVD's wall time
    moved 3x between rounds on 2026-12-06), the process's own CPU time far less."""
    times: dict = {"load": [os.getloadavg()[0]]}
    grads = {s: torch.randn(*s, generator=torch.Generator().manual_seed(0)) for s in SHAPES_1B}
    for _ in range(rounds):
        for shape in SHAPES_1B:
            g, side = grads[shape], std_side(shape)
            jobs = [("svd", lambda: svd_projection(g, 512, side))] + [
                ((q, o), lambda q=q, o=o: randomized_range(RowShards(g), 512, side, power_iters=q, oversample=o, seed=1))
                for q, o in SETTINGS
            ]
            if side == "right":  # the default without the Gram path, where the Gram path is taken
                jobs.append(("no gram", lambda: randomized_range(RowShards(g), 512, side, seed=1, gram=False)))
            for key, fn in jobs:
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                times[(shape, key)] = min(cpu, times.get((shape, key), float("inf")))
                print(shape, key, f"cpu {cpu:.2f}s wall {wall:.2f}s", flush=True)
        times["load"].append(os.getloadavg()[0])
    return times


def fmt(x: float) -> str:
    return f"{x:.1e}"


def render(acc: list[dict] | None, times: dict) -> str:
    default = (DEFAULT_POWER_ITERS, DEFAULT_OVERSAMPLE)
    lines = [
        START,
        "## Randomized-refresh defaults: power iterations x oversampling (issue 23)",
        "",
        f"Run {DATE}, {DEVICE}; `benchmarks/galore_refresh_defaults.py`. Default now: "
        f"{default[0]} power iterations, oversampling {default[1]}. Load average (1 min) at the start "
        f"and after each speed round: {', '.join(f'{x:.1f}' for x in times['load'])} (2 cores, shared).",
        "",
        "**Speed**: CPU time (`time.process_time`, 1 thread) of one refresh at the LLaMA-1B shapes, rank "
        "512, each setting and the full SVD interleaved in one process (minimum over rounds; wall-clock "
        "time on this loaded machine mostly measures the other jobs), and the whole-model refresh "
        "(168 matrices) extrapolated. The tall 5461 x 2048 takes the Gram path (`H = G^T G` once).",
        "",
        "| setting | " + " | ".join(f"{m} x {n}" for m, n in SHAPES_1B) + " | 1B model, one refresh |",
        "|---|" + "---|" * (len(SHAPES_1B) + 1),
    ]
    svd_total = sum(times[(s, "svd")] * COUNTS_1B[s] for s in SHAPES_1B)
    lines.append(
        "| full SVD | " + " | ".join(f"{times[(s, 'svd')]:.2f} s" for s in SHAPES_1B) + f" | {svd_total:.0f} s |"
    )
    for q, o in SETTINGS:
        total = sum(times[(s, (q, o))] * COUNTS_1B[s] for s in SHAPES_1B)
        cells = [f"{times[(s, (q, o))]:.2f} s ({times[(s, 'svd')] / times[(s, (q, o))]:.1f}x)" for s in SHAPES_1B]
        mark = " (default)" if (q, o) == default else ""
        lines.append(f"| {q} iters, +{o}{mark} | " + " | ".join(cells) + f" | {total:.0f} s ({svd_total / total:.1f}x) |")
    gram_rows = [s for s in SHAPES_1B if (s, "no gram") in times]
    if gram_rows:
        cells = [f"{times[(s, 'no gram')]:.2f} s ({times[(s, 'svd')] / times[(s, 'no gram')]:.1f}x)"
                 if s in gram_rows else "(same as the default)" for s in SHAPES_1B]
        total = sum(times[(s, "no gram" if s in gram_rows else default)] * COUNTS_1B[s] for s in SHAPES_1B)
        lines.append("| default without the Gram path (`gram=False`) | " + " | ".join(cells)
                     + f" | {total:.0f} s ({svd_total / total:.1f}x) |")
    if acc:
        lines += [
            "",
            "**Accuracy**: largest relative gap to the exact-SVD trajectory over 30 steps (refresh every 5), "
            "GaLore and Fira (paper convention), full-rank gradients: a drifting signal of the projection's "
            "rank (singular values 1 .. 0.1) plus noise of spectral norm `noise`. `fp64 SVD`: the exact "
            "refresh from the fp64 gradient (the floor). `SVD, G(1+1e-7 z)`: the exact refresh's own "
            "trajectory when every gradient entry is perturbed by a relative 1e-7 (fp32 rounding level): "
            "how well the exact-SVD trajectory itself is defined. Goal: <= 1e-3.",
            "",
            "| noise | shape | rank | method | fp64 SVD | SVD, G(1+1e-7 z) | " + " | ".join(f"{q} iters, +{o}" for q, o in SETTINGS) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(SETTINGS),
        ]
        for r in acc:
            cells = [fmt(r["gaps"][s]) + ("" if r["gaps"][s] <= 1e-3 else " ✗") if s in r["gaps"] else "-"
                     for s in SETTINGS]
            lines.append(
                f"| {r['noise']} | {r['shape'][0]} x {r['shape'][1]} | {r['rank']} | {r['method']} | {fmt(r['fp64'])} | "
                f"{fmt(r['perturbed']) if 'perturbed' in r else '-'} | "
                + " | ".join(cells) + " |"
            )
    lines.append(END)
    return "\n".join(lines) + "\n"


ACCURACY_JSON = ROOT / "docs" / "benchmarks" / "galore_refresh_defaults.json"


def save_accuracy(acc: list[dict]) -> None:
    rows = [{**r, "shape": list(r["shape"]), "gaps": {f"{q},{o}": v for (q, o), v in r["gaps"].items()}} for r in acc]
    ACCURACY_JSON.write_text(json.dumps(rows, indent=1) + "\n")


def load_accuracy(path: Path = ACCURACY_JSON) -> list[dict]:
    rows = json.loads(path.read_text())
    return [
        {**r, "shape": tuple(r["shape"]), "gaps": {tuple(map(int, k.split(","))): v for k, v in r["gaps"].items()}}
        for r in rows
    ]


def accuracy_from_log(path: str) -> list[dict]:
    """The accuracy rows a previous run printed (one dict a line)."""
    return [ast.literal_eval(line) for line in Path(path).read_text().splitlines() if line.startswith("{'noise'")]


def write(section: str) -> None:
    path = ROOT / "docs" / "benchmarks" / "galore_refresh.md"
    text = path.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--accuracy-from-log", help="take the accuracy rows from a previous run's printed output")
    ap.add_argument("--sweep", action="store_true", help="only print the perturbation sweep's rows")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.sweep:
        perturbation_sweep()
        return
    if args.accuracy_from_log:
        acc = accuracy_from_log(args.accuracy_from_log)
    elif args.skip_accuracy:
        acc = load_accuracy() if ACCURACY_JSON.exists() else None
    else:
        acc = accuracy()
    if acc and not args.no_write:
        save_accuracy(acc)
    times = speed(args.rounds)
    section = render(acc, times)
    print(section)
    if not args.no_write:
        write(section)


if __name__ == "__main__":
    main()
