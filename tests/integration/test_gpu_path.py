"""The GPU path on CPU: every recipe at 2 ranks (FSDP2 over gloo) with the recipes' bf16 mixed
precision (``--slimtrain.cpu_mixed_precision``: FSDP2 parameters in bf16, reduction in fp32 as the
recipes set it) and activation checkpointing (``full`` and ``selective``, alternating over the
recipes), with restarts and merges inside the run (every 2 steps).

Each recipe: the bf16 + checkpointed run resumes bitwise (same mode), its losses are finite and
within 0.05 of the fp32 run without checkpointing at every step. Why 0.05: bf16 keeps 8 bits of
mantissa, a relative rounding of 2^-9 (0.2%) per stored value; the loss of the nano flavor is about
8.8, so one rounding of it alone is about 0.02, and 6 steps of bf16 weights add a little more
(measured at most about 1e-3 here). Activation checkpointing alone changes nothing in fp32 (it
recomputes the same forward), so any larger gap is a bug of the mixed-precision path.

Not here yet (issue 15 continues): ``--compile.enable`` for every recipe (a compiled nano run takes
about 100 s on 2 CPU cores, too long for every recipe in CI; it trains, checked by hand for
sltrain_restarts) and graph-break counts.
"""

from __future__ import annotations

import math

import pytest

from .helpers import RECIPE_OVERRIDES, offline_args, read_log, run_many

pytestmark = pytest.mark.integration

STEPS, HALF = 6, 3
TOLERANCE = 0.05


def test_every_recipe_bf16_with_activation_checkpointing_two_ranks(offline_assets, tmp_path):
    a = offline_assets
    recipes = list(RECIPE_OVERRIDES)
    runs, modes = [], {}
    for i, r in enumerate(recipes):
        modes[r] = "full" if i % 2 == 0 else "selective"
        base = ["--job.config_file", f"plugins/{r}.toml", *offline_args(a), *RECIPE_OVERRIDES[r],
                "--checkpoint.interval", "3"]
        gpu_path = ["--slimtrain.cpu_mixed_precision", "--activation_checkpoint.mode", modes[r]]
        fp32, straight, resumed = (tmp_path / f"{r}_{k}" for k in ("fp32", "straight", "resumed"))
        runs += [
            {"name": f"{r}/fp32", "args": [*base, "--training.steps", str(STEPS), "--job.dump_folder", str(fp32),
                                           "--checkpoint.no-enable", "--slimtrain.loss_log", f"{fp32}.jsonl"]},
            {"name": f"{r}/straight", "args": [*base, *gpu_path, "--training.steps", str(STEPS),
                                               "--job.dump_folder", str(straight),
                                               "--slimtrain.loss_log", f"{straight}.jsonl"]},
            {"name": f"{r}/half", "args": [*base, *gpu_path, "--training.steps", str(HALF),
                                           "--lr_scheduler.total_steps", str(STEPS),
                                           "--job.dump_folder", str(resumed),
                                           "--slimtrain.loss_log", f"{resumed}.jsonl"]},
            {"name": f"{r}/resume", "args": [*base, *gpu_path, "--training.steps", str(STEPS),
                                             "--job.dump_folder", str(resumed),
                                             "--slimtrain.loss_log", f"{resumed}.jsonl"]},
        ]
    results = run_many(2, runs, tmp_path)
    for r in recipes:
        for kind in ("fp32", "straight", "half", "resume"):
            assert results[f"{r}/{kind}"]["ok"], f"{r}/{kind} ({modes[r]}): {results[f'{r}/{kind}']['error']}"
        fp32, _ = read_log(tmp_path / f"{r}_fp32.jsonl")
        straight, _ = read_log(tmp_path / f"{r}_straight.jsonl")
        resumed, _ = read_log(tmp_path / f"{r}_resumed.jsonl")
        assert [e["step"] for e in straight] == list(range(1, STEPS + 1)), r
        assert all(math.isfinite(e["loss"]) for e in straight), r
        assert [e["loss"] for e in resumed] == [e["loss"] for e in straight], f"{r}: bf16 resume not bitwise"
        gaps = [abs(b["loss"] - f["loss"]) for b, f in zip(straight, fp32)]
        assert max(gaps) <= TOLERANCE, f"{r} ({modes[r]}): bf16 vs fp32 loss gaps {gaps}"
        # the bf16 run really ran in bf16: its losses are not the fp32 run's bits
        assert [e["loss"] for e in straight] != [e["loss"] for e in fp32], f"{r}: bf16 run equals fp32"
