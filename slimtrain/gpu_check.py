"""``slimtrain gpu-check``: every GPU goal of the project measured by one prepared command.

Why: a GPU is lent to few sessions, for minutes, on a machine that reaches no package index. The
minutes go to this one command, which runs the measurements in the issue's order of value and stops
cleanly when its time is up (default 9 minutes of wall time):

1. ``recipes_60m``: every recipe (plugins/*.toml but the 7B one) at the 60m flavor, 30 steps,
   compiled (losses, tokens/s, peak memory, graph breaks and recompiles), with projection refreshes,
   refactorizations, merges and momentum resets every 10 steps, so they happen inside the run;
2. ``speed_1b``: the 1b speed comparison: full_rank, galore, fira, low_rank, sltrain and the frontier
   methods (apollo, apollo_mini, muon, scale, sltrain_apollo_mini), compiled, selective activation
   checkpointing (tokens/s and peak memory side by side; the recipes' own refresh intervals);
3. ``galore_refresh``: the GaLore refresh at the LLaMA-1B shapes, randomized vs full SVD;
4. ``layers_bf16``: the parametrized layers against a dense Linear in bf16;
4b. ``quant8_step``: the optimizer step of one block with 8-bit state, fused and unfused, against
   full precision at the 60m and 1B shapes (``benchmarks/quant8_step_time.py``, issue 26's table;
   on the GPU the fused step is torch.compile's triton kernel; a row against torchao's AdamW8bit,
   issue 26's GPU goal of <= 1.2x at 1B, where ``torchao`` is installed);
5. ``memory_7b_model`` then ``memory_7b``: the 7b memory of plugins/sltrain_7b_single_gpu.toml, first
   the analytic model (``slimtrain memory --flavor 7b ... --device --batch 16 --seq-len 256 --ac full``),
   then the real peak of a few steps of the recipe as written (batch 16 x 256, full AC), skipped with
   a note when the model says it does not fit this GPU;
6. ``mesh_2d``: for the day a machine with 4+ GPUs is lent: HSDP (replicate 2 x shard 2) at 60m on 4
   GPUs, the recipes with whole-matrix math (galore, muon) and sltrain, compiled, 30 steps (losses,
   tokens/s, peak memory per rank); skipped with a note on fewer GPUs (and in the CPU smoke: the
   suite runs the 4-rank CPU meshes itself, tests/integration/test_parallel_meshes.py).

The training steps are one torchrun launch each of ``titan_integration/run_plan.py`` (torch and
torchtitan imported once, dynamo reset between runs, inductor's cache shared: the recipes with the
same model graph compile once), with exactly the arguments ``slimtrain bench`` would give each run
(slimtrain/bench/runner.py), and its metrics read the same way. After every step it rewrites
``<out>/gpu_check_<date>.md`` and ``.json`` with what has finished, so a run cut short keeps every
finished measurement (a cut training step keeps its finished runs). ``--dry-run`` prints the commands;
``--cpu-smoke`` runs the whole sequence on CPU at the nano flavor and small shapes (the test suite
does, so the script cannot rot).

On the GPU machine (torch 2.11, no index; torchtitan from the wheels of
``shared/gpu/prepare-wheels.sh``, the corpus prepared here and carried):

    slimtrain prepare-data --vocab-size 32000 --data-dir .gpu-data      # here, once
    # carry .whl and .gpu-data; there:
    scripts/gpu_check.sh --data-dir .gpu-data
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SINGLE_GPU_7B = "sltrain_7b_single_gpu"
SPEED_RECIPES = ("full_rank", "galore", "fira", "low_rank", "sltrain")
FRONTIER_RECIPES = ("apollo", "apollo_mini", "muon", "scale", "sltrain_apollo_mini")
# every periodic hook fires inside a 30-step run (a flag for a method the recipe lacks only warns)
EVERY_10 = ("--galore.update_proj_gap", "10", "--fira.update_proj_gap", "10", "--apollo.update_proj_gap", "10",
            "--apollo_mini.update_proj_gap", "10", "--refactorization.every", "10", "--lora_merge.every", "10",
            "--momentum_reset.every", "10", "--momentum_reset.warmup_steps", "2")
# the speed runs skip validation: its no_grad forward recompiles every compiled block once (dynamo's
# grad-mode guard), tens of GPU seconds at 1b for a figure the speed comparison does not use
NO_VALIDATION = ("--validation.no-enable",)
MESH_2D_RECIPES = ("galore", "muon", "sltrain")
HSDP_2X2 = ("--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2")
MESH_2D_GPUS = 4
MEMORY_7B = ("--flavor", "7b", "--recipes", f"plugins/{SINGLE_GPU_7B}.toml", "--device", "--batch", "16",
             "--seq-len", "256", "--ac", "full")


def all_recipes() -> list[str]:
    """Every recipe in plugins/ but the 7B single-GPU one (it has its own step)."""
    return sorted(p.stem for p in (ROOT / "plugins").glob("*.toml") if p.stem != SINGLE_GPU_7B)


@dataclasses.dataclass
class Step:
    name: str
    goal: str
    command: list[str]
    cap_s: float  # the most this step may take
    runs: list = dataclasses.field(default_factory=list)  # bench RunSpecs of a training step (run_plan)
    skip: str = ""  # why it is not run (yet)
    precheck: Callable[[list[dict]], str] | None = None  # a reason to skip, from the finished steps

    @property
    def plan_file(self) -> Path | None:
        return self.runs[0].out / "plan.json" if self.runs else None


def _train_step(name: str, goal: str, cap_s: float, recipes, flavor: str, steps: int, batch: int, seq: int,
                out: Path, extra: tuple[str, ...], rank: int | None, val_steps: int = 1, nproc: int = 1) -> Step:
    """A training step: the runs ``slimtrain bench`` would start, in one run_plan launch."""
    from slimtrain.bench import runner

    runs = [runner.RunSpec(r, None, flavor, steps, 1, batch, seq, out, max(1, steps // 2), val_steps, extra,
                           _flavor_settings(r, flavor, rank)) for r in recipes]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "slimtrain.titan_integration.run_plan", str(out / "plan.json")]
    return Step(name, goal, command, cap_s, runs=runs)


def _flavor_settings(recipe: str, flavor: str, rank: int | None) -> dict[str, dict]:
    """``slimtrain bench``'s per-method settings of the flavor (its rank, the papers' size settings).
    They need torchtitan (the flavors); a --dry-run on a machine without it prints the runs without
    them (the run itself, after the wheels are installed, has them)."""
    try:
        from slimtrain.bench.cli import method_overrides
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("torchtitan"):
            return {}
        raise
    return method_overrides(recipe, flavor, rank)


def _run_args(spec) -> list[str]:
    cmd = spec.command()
    return cmd[cmd.index(str(ROOT / "titan_integration" / "train.py")) + 1:]


def plan(out: Path, smoke: bool) -> list[Step]:
    py = sys.executable
    cli = [py, "-m", "slimtrain.cli"]
    if smoke:
        flavor60, flavor1b, flavor7b, steps, batch, seq, rank = "nano", "nano", "nano", 3, 2, 32, 8
        recipes60, speed = ["sltrain_restarts", "galore"], ["galore", "apollo_mini"]  # the smoke checks the script
        refresh = ["--shapes", "96x64,64x96", "--rank", "8", "--repeats", "1"]
        layers = ["--device", "cpu", "--dtype", "bfloat16", "--sizes", "nano", "--layers", "attn_wq", "--tokens", "32",
                  "--reps", "1"]
        compile_flags = ()
        quant8 = ["--flavors", "nano", "--rounds", "1", "--warmup", "1", "--device", "cpu"]
        # the memory model knows the paper flavors only: its smallest stands in for nano
        memory = ["--flavor", "60m", *MEMORY_7B[2:5], "--batch", "2", "--seq-len", "32", "--ac", "full"]
        memory_7b_flags = ("--sltrain.rank", "8")
    else:
        flavor60, flavor1b, flavor7b, steps, batch, seq, rank = "60m", "1b", "7b", 30, 4, 256, None
        recipes60, speed = all_recipes(), [*SPEED_RECIPES, *FRONTIER_RECIPES]
        refresh = ["--repeats", "3"]
        layers = ["--device", "cuda", "--dtype", "bfloat16", "--tokens", "8192"]
        compile_flags, memory, memory_7b_flags = ("--compile.enable",), list(MEMORY_7B), ()
        quant8 = ["--flavors", "60m,1b", "--rounds", "7", "--device", "cuda", "--profile"]
    memory_model = out / "memory_7b_model.txt"
    measured_7b = _train_step(
        "memory_7b", f"7b single-GPU recipe ({SINGLE_GPU_7B}, batch 16 x 256, full AC): real peak of 4 steps",
        150, [SINGLE_GPU_7B], flavor7b, 4, 16, 256, out / "memory_7b",
        (*NO_VALIDATION, *memory_7b_flags), rank=None)
    measured_7b.runs[0].overrides = {}  # the recipe as written (rank 512), as the memory model reads it
    if smoke:
        measured_7b.runs[0].batch, measured_7b.runs[0].seq_len = 2, 32
    measured_7b.precheck = lambda records: _fits_this_gpu(memory_model)
    mesh_2d = _train_step(
        "mesh_2d", f"HSDP replicate 2 x shard 2 on {MESH_2D_GPUS} GPUs at {flavor60}, {steps} steps, compiled: "
        "losses, tokens/s, peak memory per rank", 150, MESH_2D_RECIPES, flavor60, steps, batch, seq,
        out / "mesh_2d", (*compile_flags, *EVERY_10, *HSDP_2X2, *NO_VALIDATION), rank, nproc=MESH_2D_GPUS)
    mesh_2d.precheck = _enough_gpus
    return [
        _train_step("recipes_60m", f"every recipe at {flavor60}, {steps} steps, compiled, hooks every 10 steps: "
                    "losses, tokens/s, peak memory, graph breaks, recompiles", 270, recipes60, flavor60, steps, batch,
                    seq, out / "bench_60m", (*compile_flags, *EVERY_10), rank),
        _train_step("speed_1b", f"{flavor1b} tokens/s and peak memory side by side (incl. the frontier methods), "
                    "compiled, selective activation checkpointing", 150, speed, flavor1b, steps, batch, seq,
                    out / "bench_1b", (*compile_flags, "--activation_checkpoint.mode", "selective", *NO_VALIDATION), rank),
        Step("galore_refresh", "GaLore refresh at 1B shapes: randomized vs full SVD (goal >= 20x)",
             [py, str(ROOT / "benchmarks/galore_refresh.py"), *refresh, "--loss-steps", "0", "--real-steps", "0",
              "--out", str(out / "galore_refresh.md")], 60),
        Step("layers_bf16", "parametrized layers vs dense Linear in bf16 (goal: low-rank, SLTrain no slower)",
             [py, str(ROOT / "benchmarks/parametrized_layers.py"), *layers, "--out", str(out / "parametrized_layers.md")],
             120),
        Step("quant8_step", "optimizer step of one block at 60m and 1B shapes: adamw + state_8bit (fused) vs adamw "
             "(goal <= 2.0x), galore + state_8bit vs galore (goal <= 1.5x)",
             [py, str(ROOT / "benchmarks/quant8_step_time.py"), *quant8, "--out", str(out / "quant8_step_time.md")], 90),
        Step("memory_7b_model", "7b single-GPU recipe: the analytic GPU memory model (registry/device_memory.py)",
             [*cli, "memory", *memory], 60),
        measured_7b,
        mesh_2d,
    ]


def _enough_gpus(records: list[dict]) -> str:
    """A reason to skip the 2-D mesh step: fewer than MESH_2D_GPUS GPUs here."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch, no GPUs
        n = 0
    if n < MESH_2D_GPUS:
        return (f"needs {MESH_2D_GPUS} GPUs for HSDP 2 x 2, this machine has {n} (the 4-rank CPU meshes run "
                f"in the suite: tests/integration/test_parallel_meshes.py)")
    return ""


def _model_total_gb(text: str) -> float | None:
    """The 'total' column (GB) of the recipe's row in ``slimtrain memory --device``'s table."""
    for line in text.splitlines():
        if line.startswith(f"| {SINGLE_GPU_7B} |"):
            try:
                return float(line.strip().strip("|").split("|")[-1])
            except ValueError:
                return None
    return None


def _fits_this_gpu(model_file: Path) -> str:
    """'' when the 7b run may go ahead, else why it is skipped (the analytic total over this GPU's memory)."""
    import torch

    if not torch.cuda.is_available():
        return ""  # the CPU smoke runs its small stand-in
    total = _model_total_gb(model_file.read_text()) if model_file.exists() else None
    capacity = torch.cuda.get_device_properties(0).total_memory / 1e9
    if total is not None and total > 0.95 * capacity:
        return f"does not fit: the memory model says {total:.2f} GB, this GPU has {capacity:.1f} GB"
    return ""


def check_environment(smoke: bool, data_dir: str | None) -> list[str]:
    """What is missing for a real GPU check, each said with what to do about it."""
    problems = []
    if importlib.util.find_spec("torchtitan") is None:
        wheels = ROOT / ".whl"
        problems.append(
            "torchtitan is not importable"
            + ("" if wheels.is_dir() else " and there is no .whl folder")
            + ": run shared/gpu/prepare-wheels.sh where the package index is reachable, carry .whl, and install "
            "them with pip --no-index --target .site (scripts/gpu_check.sh does when .whl is there)"
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
    """One row per run of a training step: what its metrics log and run_plan's results say."""
    if not step.runs:
        return []
    from slimtrain.bench import runner

    results_file = step.plan_file.with_name("results.json")
    launched = {r["name"]: r for r in json.loads(results_file.read_text())} if results_file.exists() else {}
    rows = []
    for spec in step.runs:
        result = runner.RunResult(spec, ok=False)
        runner.read_metrics(spec.folder / "metrics.jsonl", result)
        done = launched.get(spec.name)
        status = "not run (time)" if done is None else ("ok" if done["ok"] else "failed")
        mem = result.memory.get("peak_bytes", -1) if result.memory else -1
        compiled = (done or {}).get("compile", {})
        nan_none = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
        rows.append({
            "recipe": spec.recipe, "status": status,
            "final_train_loss": nan_none(result.final_loss), "val_loss": nan_none(result.val_loss),
            "tokens_per_s": nan_none(result.tokens_per_s), "peak_memory_gib": mem / 2**30 if mem >= 0 else None,
            "graph_breaks": compiled.get("graph_breaks"), "recompiles": compiled.get("recompiles"),
            "seconds": (done or {}).get("seconds"), "error": (done or {}).get("error"),
        })
    return rows


def write_plan(step: Step) -> None:
    for spec in step.runs:
        spec.folder.mkdir(parents=True, exist_ok=True)
        (spec.folder / "metrics.jsonl").unlink(missing_ok=True)
    results = step.plan_file.with_name("results.json")
    results.unlink(missing_ok=True)
    step.plan_file.write_text(json.dumps({"results": str(results), "runs": [
        {"name": spec.name, "args": _run_args(spec)} for spec in step.runs]}, indent=1))


def write_report(out: Path, header: dict, records: list[dict]) -> Path:
    stem = out / f"gpu_check_{header['date']}"
    (stem.with_suffix(".json")).write_text(json.dumps({**header, "steps": records}, indent=2, default=str))
    lines = [f"# GPU check, {header['date']}", "", f"Device: {header['device']}; torch {header['torch']}; "
             f"mode: {header['mode']}; budget {header['budget_s']:.0f} s.", "",
             "| step | goal | status | wall s |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['goal']} | {r['status']} | {r['wall_s']:.0f} |")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in records:
        if r["rows"]:
            lines += ["", f"## {r['name']}", "", "| recipe | status | final loss | val loss | tokens/s | peak GiB | "
                      "graph breaks | recompiles |", "|---|---|---|---|---|---|---|---|"]
            for row in r["rows"]:
                lines.append(f"| {row['recipe']} | {row['status']} | {fmt(row['final_train_loss'], '.3f')} | "
                             f"{fmt(row['val_loss'], '.3f')} | {fmt(row['tokens_per_s'], '.0f')} | "
                             f"{fmt(row['peak_memory_gib'], '.2f')} | {fmt(row['graph_breaks'], 'd')} | "
                             f"{fmt(row['recompiles'], 'd')} |")
            errors = [f"{row['recipe']}: {row['error']}" for row in r["rows"] if row.get("error")]
            lines += ["", *errors] if errors else []
        if r["name"] == "memory_7b_model" and r["tail"]:
            lines += ["", "## memory_7b_model", "", *[ln for ln in r["tail"] if ln.startswith("|")]]
        if r["status"] not in ("ok",) and not r["status"].startswith("skipped") and r["tail"]:
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
    out = Path(args.out).resolve()
    steps = plan(out, args.cpu_smoke)
    if args.dry_run:
        for s in steps:
            print(f"# {s.name}: {s.goal} (at most {s.cap_s:.0f} s)")
            print(f"  skipped: {s.skip}" if s.skip else "  " + " ".join(s.command))
            for spec in s.runs:
                print(f"    {spec.name}: " + " ".join(_run_args(spec)))
        return 0
    problems = check_environment(args.cpu_smoke, args.data_dir)
    if problems:
        for problem in problems:
            print(f"slimtrain gpu-check: {problem}", file=sys.stderr)
        return 2
    import torch

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if args.data_dir:
        env["SLIMTRAIN_DATA_DIR"] = str(Path(args.data_dir).resolve())
    if args.cpu_smoke:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
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
        skip = s.skip or (s.precheck(records) if s.precheck else "")
        if skip:
            record["status"] = f"skipped: {skip}"
        elif left < 10:
            record["status"] = "not run: budget spent"
        else:
            if s.runs:
                write_plan(s)
            start = time.monotonic()
            print(f"[gpu-check] {s.name} (at most {min(s.cap_s, left):.0f} s)", flush=True)
            try:
                proc = subprocess.run(s.command, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=min(s.cap_s, left))
                record["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                record["tail"] = (proc.stdout + proc.stderr).splitlines()[-20:]
                if s.name == "memory_7b_model":
                    (out / "memory_7b_model.txt").write_text(proc.stdout)
            except subprocess.TimeoutExpired as exc:
                record["status"] = "timed out (partial)"
                record["tail"] = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                                  else (exc.stdout or "")).splitlines()[-20:]
            record["wall_s"] = time.monotonic() - start
            record["rows"] = summarize(s)
            if record["status"] == "ok" and any(r["status"] != "ok" for r in record["rows"]):
                record["status"] = "failed (a run failed)"
        records.append(record)
        report = write_report(out, header, records)  # after every step: a cut-short run keeps what finished
        print(f"[gpu-check] {s.name}: {record['status']}", flush=True)
    print(f"[gpu-check] wrote {report} and {report.with_suffix('.json')}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
