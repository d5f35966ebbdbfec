"""The GPU path on CPU at 2 ranks: FSDP2 over gloo with the recipes' bf16 mixed precision
(``--slimtrain.cpu_mixed_precision``: FSDP2 parameters in bf16, reduction in fp32 as the recipes set
it) and activation checkpointing (``full`` and ``selective``, alternating over the recipes), for
every recipe (plugins/*.toml; the default run takes gpu_path_plan.DEFAULT_RECIPES, one per distinct
machinery, and `pytest -m slow` every recipe), with restarts and merges inside the run (every 2 steps); and, in the
same launch, ``--compile.enable`` on top for three recipes (SLTrain's custom autograd function with
refactorization and momentum resets, selective AC; the dense model under Muon, selective AC; the 7B
single-GPU recipe's per-layer updates, 8-bit state and APOLLO-Mini refreshes on FSDP2, full AC, which
also resumes compiled); and bf16 alone, full AC alone and op-level selective AC alone (fp32) on
SLTrain with refactorization. LoRA merges and the low-rank refactorization are compiled at 1 rank only
(test_gpu_path_compile.py): at 2 ranks each costs ~45 s of compilation on 2 CPU cores.

Each recipe: the bf16 + checkpointed run resumes bitwise (same mode), its losses are finite, falling
and within 0.05 of the fp32 run without checkpointing at every step (why 0.05: gpu_path_plan.py).
Compiled runs: no graph break, no recompilation but the final validation's grad-mode one.
1 rank (autocast) and every recipe compiled: test_gpu_path_compile.py. Coverage: docs/gpu-path.md.
"""

from __future__ import annotations

import pytest

from .gpu_path_plan import (AC_TOL, BF16, BF16_TOL, COMPILE, FULL, SELECTIVE_OP, check_close,
                            check_compile_counts, check_trains, losses, plan, recipe_sets, run)
from .shared_launch import planner

pytestmark = pytest.mark.integration

STEPS, HALF = 6, 3
COMPILED = ("sltrain_restarts", "muon", "sltrain_7b_single_gpu")
COMPILED_RESUME = "sltrain_7b_single_gpu"
SINGLY = "sltrain_restarts"  # bf16 alone, full AC alone, op-level selective AC alone (eager: cheap)


def _runs(a, w, recipes):
    runs, modes = [], {}
    for i, r in enumerate(recipes):
        modes[r] = "full" if i % 2 == 0 else "selective"
        gpu_path = [*BF16, "--activation_checkpoint.mode", modes[r]]
        runs += [run(f"{r}/fp32", r, a, w), run(f"{r}/straight", r, a, w, gpu_path),
                 run(f"{r}/half", r, a, w, gpu_path, HALF, f"{r}_resumed", STEPS, checkpoint=True),
                 run(f"{r}/resume", r, a, w, gpu_path, STEPS, f"{r}_resumed", checkpoint=True)]
        if r in COMPILED:
            runs.append(run(f"{r}/compiled", r, a, w, [*COMPILE, *gpu_path]))
        if r == COMPILED_RESUME:
            runs += [run(f"{r}/compiled_half", r, a, w, [*COMPILE, *gpu_path], HALF, f"{r}_cresumed", STEPS, checkpoint=True),
                     run(f"{r}/compiled_resume", r, a, w, [*COMPILE, *gpu_path], STEPS, f"{r}_cresumed", checkpoint=True)]
    s = SINGLY
    runs += [run(f"{s}/bf16", s, a, w, BF16), run(f"{s}/full", s, a, w, FULL),
             run(f"{s}/selective_op", s, a, w, SELECTIVE_OP)]
    return runs, modes


@planner("gpu_path_two_ranks")
def plan_two_ranks(assets, work, recipes):
    return plan(_runs(assets, work, recipes)[0])


@pytest.mark.launch("gpu_path_two_ranks", nproc=2)
@pytest.mark.parametrize("recipes", recipe_sets())
def test_recipes_bf16_with_activation_checkpointing_two_ranks(launched, offline_assets, recipes):
    results, w = launched
    runs, modes = _runs(offline_assets, w, recipes)
    s = SINGLY
    got = {}
    for r in runs:
        res = results[r["name"]]
        assert res["ok"], f"{r['name']}: {res['error']}"
        if r["compiled"]:
            check_compile_counts(r["name"], res["compile"])
        if not r["name"].endswith("half"):
            got[r["name"]] = losses(r)
    for r in recipes:
        fp32 = got[f"{r}/fp32"]
        check_trains(f"{r}/fp32", fp32)
        kinds = ["straight", "compiled"] if r in COMPILED else ["straight"]
        for kind in kinds:
            name = f"{r}/{kind} ({modes[r]})"
            check_trains(name, got[f"{r}/{kind}"])
            check_close(name, got[f"{r}/{kind}"], fp32, BF16_TOL, must_differ=True)
        assert got[f"{r}/resume"] == got[f"{r}/straight"], f"{r}: bf16 resume not bitwise"
    for name, tol, differ in [(f"{s}/bf16", BF16_TOL, True), (f"{s}/full", AC_TOL, False),
                              (f"{s}/selective_op", AC_TOL, False)]:
        check_trains(name, got[name])
        check_close(name, got[name], got[f"{s}/fp32"], tol, must_differ=differ)
    r = COMPILED_RESUME
    assert got[f"{r}/compiled_resume"] == got[f"{r}/compiled"], f"{r}: compiled bf16 FSDP2 resume not bitwise"
