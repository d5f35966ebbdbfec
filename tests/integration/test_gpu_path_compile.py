"""``--compile.enable`` on CPU for EVERY recipe (plugins/*.toml), alone and with bf16 and activation
checkpointing, with restarts, merges, projection refreshes and momentum resets inside the run
(every 2 steps; the default run takes gpu_path_plan.DEFAULT_RECIPES, one per distinct machinery,
and `pytest -m slow` every recipe), at 1 rank (``torch.autocast("cpu", bfloat16)``, as on one GPU without FSDP).
2 ranks (FSDP2, bf16 parameters) compiled: test_gpu_path.py, in the launch of its fp32 references.

The session's shared 1-rank launch (tests/integration/shared_launch.py, titan_integration/run_plan.py)
runs every training: torch and torchtitan are imported once, dynamo is reset between runs (each run compiles its own model, and its counts are its own), and
inductor's on-disk cache serves the recipes whose compiled graph is another's (the dense model of
full_rank, GaLore, Fira, APOLLO, Muon, SCALE; LoRA's of lora and relora; SLTrain's of the three SLTrain
recipes). What is covered and what is not: docs/gpu-path.md.

Tolerances (gpu_path_plan.py says why): compiled bf16 within 0.05 of fp32 eager at every step,
compile alone within 1e-4, activation checkpointing alone within 1e-6, resume bitwise.
"""

from __future__ import annotations

import pytest

from .gpu_path_plan import (AC_TOL, ALL_RECIPES, BF16, BF16_TOL, COMPILE, COMPILE_TOL, FULL, SELECTIVE,
                            SELECTIVE_OP, check_close, check_compile_counts, check_trains, losses, plan,
                            recipe_files, recipe_sets, run)
from .shared_launch import planner

pytestmark = pytest.mark.integration

STEPS, HALF = 6, 3
GPU = [*COMPILE, *BF16, *FULL]  # what a GPU run of the big flavors does (the 7B recipe's own AC mode)


def test_every_recipe_has_its_nano_overrides():
    assert set(ALL_RECIPES) == recipe_files(), "a recipe in plugins/ is not in the GPU-path tests"


def _runs(a, w, recipes):
    runs = []
    for r in recipes:
        runs += [run(f"{r}/fp32", r, a, w), run(f"{r}/gpu", r, a, w, GPU)]
    # singly and in the other combinations, on the two recipes with the most machinery: SLTrain's
    # custom autograd function with refactorization and momentum resets; the 7B recipe's
    # per-layer updates (post-accumulate-grad hooks) with 8-bit state and APOLLO-Mini refreshes
    s, p = "sltrain_restarts", "sltrain_7b_single_gpu"
    runs += [run(f"{s}/compile", s, a, w, COMPILE), run(f"{s}/full", s, a, w, FULL),
             run(f"{s}/selective_op", s, a, w, SELECTIVE_OP), run(f"{s}/bf16", s, a, w, BF16),
             run(f"{p}/gpu_selective_op", p, a, w, [*COMPILE, *BF16, *SELECTIVE_OP]),
             # resume inside the compiled bf16 mode (checkpoint at step 3, refreshes at 2 and 4)
             run(f"{p}/gpu_half", p, a, w, GPU, HALF, "resumed", STEPS, checkpoint=True),
             run(f"{p}/gpu_resume", p, a, w, GPU, STEPS, "resumed", checkpoint=True)]
    # bad input through the training command: refused before the model (no dump folder written)
    bad = run("bad/selective_option", "full_rank", a, w, [*SELECTIVE, "--activation_checkpoint.selective_ac_option", "0"])
    return runs, bad


@planner("gpu_path_compiled_one_rank")
def plan_one_rank(assets, work, recipes):
    runs, bad = _runs(assets, work, recipes)
    return plan([*runs, bad])


@pytest.mark.launch("gpu_path_compiled_one_rank", nproc=1)
@pytest.mark.parametrize("recipes", recipe_sets())
def test_recipes_compiled_one_rank(launched, offline_assets, recipes):
    results, w = launched
    runs, bad = _runs(offline_assets, w, recipes)
    s, p = "sltrain_restarts", "sltrain_7b_single_gpu"

    assert not results[bad["name"]]["ok"] and "selective_ac_option = '0'" in results[bad["name"]]["error"]
    assert not (w / "bad_selective_option").exists()
    got = {}
    for r in runs:
        res = results[r["name"]]
        assert res["ok"], f"{r['name']}: {res['error']}"
        if r["compiled"]:
            check_compile_counts(r["name"], res["compile"])
        got[r["name"]] = losses(r)
    for r in recipes:
        check_trains(f"{r}/fp32", got[f"{r}/fp32"])
        check_trains(f"{r}/gpu", got[f"{r}/gpu"])
        check_close(f"{r}/gpu", got[f"{r}/gpu"], got[f"{r}/fp32"], BF16_TOL, must_differ=True)
    for name, tol, differ in [(f"{s}/compile", COMPILE_TOL, False), (f"{s}/full", AC_TOL, False),
                              (f"{s}/selective_op", AC_TOL, False), (f"{s}/bf16", BF16_TOL, True),
                              (f"{p}/gpu_selective_op", BF16_TOL, True)]:
        check_trains(name, got[name])
        check_close(name, got[name], got[name.split("/")[0] + "/fp32"], tol, must_differ=differ)
    assert got[f"{p}/gpu_resume"] == got[f"{p}/gpu"], "compiled bf16 resume is not bitwise"
