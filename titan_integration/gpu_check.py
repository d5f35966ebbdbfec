"""``slimtrain gpu-check``: every GPU goal of the project measured by one prepared command.

Why: a GPU is lent to few sessions, for minutes, on a machine that reaches no package index. The
minutes go to this one command, which runs the measurements in order of value and stops cleanly
when its time is up (default 9 minutes of wall time):

1. every recipe at the 60m flavor, 30 steps, compiled (losses, tokens/s, peak memory);
2. the 1b speed comparison: full_rank, galore, fira, low_rank, sltrain, compiled, selective
   activation checkpointing (tokens/s and peak memory side by side);
3. the GaLore refresh at the LLaMA-1B shapes, randomized vs full SVD (benchmarks/galore_refresh.py);
4. the parametrized layers against a dense Linear in bf16 (benchmarks/parametrized_layers.py);
5. a 7b memory check of the single-GPU recipe (skipped, with the reason, until that recipe exists).

After every step it rewrites ``<out>/gpu_check_<date>.md`` and ``.json`` with what has finished,
so a run cut short keeps every finished measurement. ``--dry-run`` prints the commands;
``--cpu-smoke`` runs the whole sequence on CPU at the nano flavor and small shapes (the test
suite does, so the script cannot rot).

On the GPU machine (torch 2.11, no index; torchtitan from the wheels of
``shared/gpu/prepare-wheels.sh``, the corpus prepared here and carried):

    slimtrain prepare-data --vocab-size 32000 --data-dir .gpu-data      # here, once
    # carry .whl and .gpu-data; there:
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl/*.whl
    PYTHONPATH=$PWD/.site:$PWD python3 -m titan_integration.gpu_check --data-dir .gpu-data
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL_RECIPES = "full_rank,low_rank,lora,relora,galore,fira,sltrain,sltrain_restarts,low_rank_restarts"
SPEED_RECIPES = "full_rank,galore,fira,low_rank,sltrain"


@dataclasses.dataclass
class Step:
    name: str
    goal: str
    command: list[str]
    cap_s: float  # the most this step may take
    results: Path | None = None  # a bench results.json to summarize
    skip: str = ""  # why it is not run (yet)


def plan(out: Path, smoke: bool) -> list[Step]:
    py = sys.executable
    cli = [py, "-m", "titan_integration.cli"]
    if smoke:
        flavor60, flavor1b, steps, batch, seq = "nano", "nano", "2", "2", "32"
        recipes60, speed = "sltrain", "galore"  # one run each: the smoke checks the script, not the figures
        refresh = ["--shapes", "96x64,64x96", "--rank", "8", "--repeats", "1"]
        layers = ["--device", "cpu", "--dtype", "bfloat16", "--sizes", "nano", "--tokens", "32", "--reps", "1"]
        compile_flags, rank = [], ["--rank", "8"]
    else:
        flavor60, flavor1b, steps, batch, seq = "60m", "1b", "30", "4", "256"
        recipes60, speed = ALL_RECIPES, SPEED_RECIPES
        refresh = ["--repeats", "3"]
        layers = ["--device", "cuda", "--dtype", "bfloat16", "--tokens", "8192"]
        compile_flags, rank = ["--compile.enable"], []
    bench = lambda recipes, flavor, sub, extra: [  # noqa: E731
        *cli, "bench", "--recipes", recipes, "--flavor", flavor, "--steps", steps, "--batch", batch,
        "--seq-len", seq, "--val-steps", "1", *rank, "--out", str(out / sub), "--", *extra,
    ]
    return [
        Step("recipes_60m", "every recipe at 60m, 30 steps, compiled: losses, tokens/s, peak memory",
             bench(recipes60, flavor60, "bench_60m", compile_flags), 270, out / "bench_60m" / "results.json"),
        Step("speed_1b", "1b tokens/s and peak memory side by side, compiled, selective activation checkpointing",
             bench(speed, flavor1b, "bench_1b", [*compile_flags, "--activation_checkpoint.mode", "selective"]),
             150, out / "bench_1b" / "results.json"),
        Step("galore_refresh", "GaLore refresh at 1B shapes: randomized vs full SVD (goal >= 20x)",
             [py, str(ROOT / "benchmarks/galore_refresh.py"), *refresh, "--loss-steps", "0", "--real-steps", "0",
              "--out", str(out / "galore_refresh.md")], 60),
        Step("layers_bf16", "parametrized layers vs dense Linear in bf16 (goal: low-rank, SLTrain no slower)",
             [py, str(ROOT / "benchmarks/parametrized_layers.py"), *layers, "--out", str(out / "parametrized_layers.md")],
             120),
        Step("memory_7b", "7b single-GPU recipe: measured peak vs the memory model", [], 60,
             skip="no single-GPU 7b recipe yet (issue 14)"),
    ]


def check_environment(smoke: bool, data_dir: str | None) -> list[str]:
    """What is missing for a real GPU check, each said with what to do about it."""
    problems = []
    if importlib.util.find_spec("torchtitan") is None:
        wheels = ROOT / ".whl"
        problems.append(
            "torchtitan is not importable"
            + ("" if wheels.is_dir() else " and there is no .whl folder")
            + ": run shared/gpu/prepare-wheels.sh where the package index is reachable, carry .whl, and install "
            "them with pip --no-index --target .site (see this module's docstring)"
        )
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA device: run on the GPU machine, or use --cpu-smoke here")
        if data_dir and not (Path(data_dir) / "vocab-32000").is_dir():
            problems.append(f"--data-dir {data_dir} holds no prepared 32k-vocab corpus (vocab-32000/): "
                            f"run `slimtrain prepare-data --vocab-size 32000 --data-dir {data_dir}` first")
    return problems


def summarize(step: Step) -> list[dict]:
    if step.results is None or not step.results.exists():
        return []
    keys = ("recipe", "status", "final_train_loss", "val_loss", "tokens_per_s", "peak_memory_gib", "error")
    return [{k: r.get(k) for k in keys} for r in json.loads(step.results.read_text())["runs"]]


def write_report(out: Path, header: dict, records: list[dict]) -> Path:
    stem = out / f"gpu_check_{header['date']}"
    (stem.with_suffix(".json")).write_text(json.dumps({**header, "steps": records}, indent=2, default=str))
    lines = [f"# GPU check, {header['date']}", "", f"Device: {header['device']}; torch {header['torch']}; "
             f"mode: {header['mode']}; budget {header['budget_s']:.0f} s.", "",
             "| step | goal | status | wall s |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['goal']} | {r['status']} | {r['wall_s']:.0f} |")
    for r in records:
        if r["rows"]:
            lines += ["", f"## {r['name']}", "", "| recipe | status | final loss | val loss | tokens/s | peak GiB |",
                      "|---|---|---|---|---|---|"]
            for row in r["rows"]:
                fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
                lines.append(f"| {row['recipe']} | {row['status']} | {fmt(row['final_train_loss'], '.3f')} | "
                             f"{fmt(row['val_loss'], '.3f')} | {fmt(row['tokens_per_s'], '.0f')} | "
                             f"{fmt(row['peak_memory_gib'], '.2f')} |")
        if r["status"] not in ("ok", "skipped") and r["tail"]:
            lines += ["", f"{r['name']}: last output lines:", "", "```", *r["tail"][-8:], "```"]
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slimtrain gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks/gpu"))
    p.add_argument("--budget", type=float, default=540.0, help="wall-time budget in seconds (default 9 minutes)")
    p.add_argument("--data-dir", default=None, help="prepared corpus folder (carried to the GPU machine)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--cpu-smoke", action="store_true", help="the whole sequence on CPU at the nano flavor")
    args = p.parse_args(argv)
    out = Path(args.out)
    steps = plan(out, args.cpu_smoke)
    if args.dry_run:
        for s in steps:
            print(f"# {s.name}: {s.goal} (at most {s.cap_s:.0f} s)")
            print(f"  skipped: {s.skip}" if s.skip else "  " + " ".join(s.command))
        return 0
    problems = check_environment(args.cpu_smoke, args.data_dir)
    if problems:
        for problem in problems:
            print(f"slimtrain gpu-check: {problem}", file=sys.stderr)
        return 2
    import torch

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if args.data_dir:
        env["SLIMTRAIN_DATA_DIR"] = str(Path(args.data_dir).resolve())
    header = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__, "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "budget_s": args.budget,
    }
    deadline = time.monotonic() + args.budget
    records: list[dict] = []
    for s in steps:
        record = {"name": s.name, "goal": s.goal, "command": " ".join(s.command), "status": "", "wall_s": 0.0,
                  "rows": [], "tail": []}
        left = deadline - time.monotonic()
        if s.skip:
            record["status"] = f"skipped: {s.skip}"
        elif left < 10:
            record["status"] = "not run: budget spent"
        else:
            start = time.monotonic()
            print(f"[gpu-check] {s.name} (at most {min(s.cap_s, left):.0f} s)", flush=True)
            try:
                proc = subprocess.run(s.command, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=min(s.cap_s, left))
                record["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                record["tail"] = (proc.stdout + proc.stderr).splitlines()[-20:]
            except subprocess.TimeoutExpired as exc:
                record["status"] = "timed out (partial)"
                record["tail"] = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                                  else (exc.stdout or "")).splitlines()[-20:]
            record["wall_s"] = time.monotonic() - start
            record["rows"] = summarize(s)
        records.append(record)
        report = write_report(out, header, records)  # after every step: a cut-short run keeps what finished
        print(f"[gpu-check] {s.name}: {record['status']}", flush=True)
    print(f"[gpu-check] wrote {report} and {report.with_suffix('.json')}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
