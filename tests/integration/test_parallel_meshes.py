"""The user's training command on 2-D meshes at 4 CPU ranks (gloo, nano flavor), in one 4-rank
torchrun launch (and two short 2-rank ones):

* HSDP (``data_parallel_replicate_degree 2`` x ``data_parallel_shard_degree 2``): every recipe resumes
  bitwise (STEPS straight == HALF + resume, refreshes / refactorizations / merges / resets every 2
  steps inside the window: helpers.RECIPE_OVERRIDES);
* the HSDP checkpoint of step HALF loads under FSDP2 over the same 4 ranks (``data_parallel_shard_degree
  4``, ``--checkpoint.initial_load_path``, model + optimizer + data position) and the steps after it
  equal the HSDP run's (same data split, other reduction order; torchtitan's init is not seeded
  across meshes, so a shared checkpoint is how two meshes start from the same weights);
* FSDP 2 x TP 2 (torchtitan's Llama TP plan, factors of low_rank / lora sharded by
  titan_integration/tensor_parallel.py): every recipe but SLTrain's trains and resumes bitwise, and
  loads the HSDP checkpoint (DCP reshards it onto the TP placements, row-based rules' state onto
  their row view; the data position is not loaded: torchtitan's loader cannot reshard it from 4 to
  2 data-parallel ranks); the SLTrain recipes (TP_REFUSED) are refused before the model with the
  reason (parallel_checks.py);
* checkpoints across rank counts (CROSS_RECIPES): a 2-rank FSDP2 checkpoint resumes at 4-rank HSDP
  and the 4-rank HSDP checkpoint at 2-rank FSDP2 with ``--checkpoint.exclude_from_loading
  dataloader``; without it the run is refused before the model (checkpoint_mesh.py). Two short
  2-rank launches around the 4-rank one.

Equality with ONE rank is checked per rule at the unit level (tests/methods/test_hsdp_equality.py):
at one rank torchtitan's loader packs other sequences into the batch than 4 ranks read.
"""

from __future__ import annotations

import math

import pytest

from .helpers import RECIPE_OVERRIDES, offline_args, read_log, run_many

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, HALF = 4, 2  # the nano overrides fire every 2 steps: a refresh at 3, merges / refactorizations / resets at 2 and 4
HSDP = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2"]
FSDP4 = ["--parallelism.data_parallel_shard_degree", "4"]
TP = ["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2"]
#: recipes refused under FSDP 2 x TP 2 (parallel_checks.check_composition): SLTrain's parametrization
#: declares no tp_dims (its sparse part); every other recipe runs
TP_REFUSED = ["sltrain", "sltrain_restarts", "sltrain_apollo_mini"]
TP_RECIPES = [r for r in RECIPE_OVERRIDES if r not in TP_REFUSED]
#: |loss(HSDP or TP) - loss(FSDP2 x 4)| per step, fp32. Measured 2026-12-06 (2-core CPU, torch
#: 2.13.0+cpu, gloo): see the test docstrings.
LOSS_TOL = 1e-6  # measured: 0 (bitwise) for every recipe, HSDP vs FSDP2 x 4 from one checkpoint
#: recipes whose checkpoints cross rank counts: a parametrized model, and replicated optimizer state
CROSS_RECIPES = ["sltrain", "galore"]
FSDP2 = ["--parallelism.data_parallel_shard_degree", "2"]


def _from_checkpoint(recipe: str, mesh: list[str], tag: str, a, work, exclude: list[str] = ()) -> dict:
    """STEPS steps on ``mesh``, starting from the HSDP run's step-HALF checkpoint (everything in it
    but ``exclude``)."""
    base = ["--job.config_file", f"plugins/{recipe}.toml", *offline_args(a), *RECIPE_OVERRIDES[recipe], *mesh,
            "--validation.no-enable"]
    out = work / f"{recipe}_{tag}_straight"
    load = ["--checkpoint.initial_load_path", str(work / f"{recipe}_hsdp_resumed" / "checkpoint" / f"step-{HALF}"),
            "--checkpoint.no_initial_load_model_only"]
    if exclude:
        load += ["--checkpoint.exclude_from_loading", ",".join(exclude)]
    return {"name": f"{recipe}/{tag}/straight", "args": [*base, *load, "--training.steps", str(STEPS),
                                                         "--job.dump_folder", str(out),
                                                         "--slimtrain.loss_log", f"{out}.jsonl"]}


def _runs(recipe: str, mesh: list[str], tag: str, a, work, resume: bool = True) -> list[dict]:
    base = ["--job.config_file", f"plugins/{recipe}.toml", *offline_args(a), *RECIPE_OVERRIDES[recipe], *mesh,
            "--validation.no-enable"]
    straight, resumed = work / f"{recipe}_{tag}_straight", work / f"{recipe}_{tag}_resumed"
    runs = [{"name": f"{recipe}/{tag}/straight", "args": [*base, "--training.steps", str(STEPS),
                                                         "--job.dump_folder", str(straight),
                                                         "--slimtrain.loss_log", f"{straight}.jsonl"]}]
    if resume:
        runs += [
            {"name": f"{recipe}/{tag}/half", "args": [*base, "--training.steps", str(HALF),
                                                      "--lr_scheduler.total_steps", str(STEPS),
                                                      "--job.dump_folder", str(resumed),
                                                      "--slimtrain.loss_log", f"{resumed}.jsonl"]},
            {"name": f"{recipe}/{tag}/resume", "args": [*base, "--training.steps", str(STEPS),
                                                        "--job.dump_folder", str(resumed),
                                                        "--slimtrain.loss_log", f"{resumed}.jsonl"]},
        ]
    return runs


def _losses(work, recipe, tag, kind="straight") -> list[float]:
    train, _ = read_log(work / f"{recipe}_{tag}_{kind}.jsonl")
    return [e["loss"] for e in train]


def _steps(work, recipe, tag, kind="straight") -> list[int]:
    train, _ = read_log(work / f"{recipe}_{tag}_{kind}.jsonl")
    return [e["step"] for e in train]


def _cross(recipe: str, mesh: list[str], tag: str, a, work, source, exclude: bool) -> dict:
    """STEPS steps on ``mesh`` from ``source`` (a step-HALF checkpoint folder written by another rank count)."""
    base = ["--job.config_file", f"plugins/{recipe}.toml", *offline_args(a), *RECIPE_OVERRIDES[recipe], *mesh,
            "--validation.no-enable"]
    out = work / f"{recipe}_{tag}_straight"
    load = ["--checkpoint.initial_load_path", str(source), "--checkpoint.no_initial_load_model_only"]
    if exclude:
        load += ["--checkpoint.exclude_from_loading", "dataloader"]
    return {"name": f"{recipe}/{tag}/straight", "args": [*base, *load, "--training.steps", str(STEPS),
                                                         "--job.dump_folder", str(out),
                                                         "--slimtrain.loss_log", f"{out}.jsonl"]}


@pytest.fixture(scope="module")
def results(offline_assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("meshes")
    # 2 ranks first: the FSDP2 checkpoints of step HALF that the 4-rank HSDP runs resume from
    first = [_runs(r, FSDP2, "fsdp2", offline_assets, work)[1] for r in CROSS_RECIPES]
    (work / "two_ranks_first").mkdir()
    res = run_many(2, first, work / "two_ranks_first")
    runs = []
    for r in CROSS_RECIPES:
        source = work / f"{r}_fsdp2_resumed" / "checkpoint" / f"step-{HALF}"
        runs.append(_cross(r, HSDP, "hsdp_from_fsdp2", offline_assets, work, source, exclude=True))
        runs.append(_cross(r, HSDP, "hsdp_from_fsdp2_whole", offline_assets, work, source, exclude=False))
    for r in RECIPE_OVERRIDES:
        straight, half, resume = _runs(r, HSDP, "hsdp", offline_assets, work)
        # FSDP2 x 4 (and TP) from the half checkpoint before the HSDP resume adds later ones
        runs += [straight, half, _from_checkpoint(r, FSDP4, "fsdp4", offline_assets, work)]
        if r in TP_RECIPES:
            runs.append(_from_checkpoint(r, TP, "tp_from_hsdp", offline_assets, work, exclude=["dataloader"]))
        runs.append(resume)
    for r in [*TP_RECIPES, *TP_REFUSED]:
        runs += _runs(r, TP, "tp", offline_assets, work, resume=r in TP_RECIPES)
    res.update(run_many(4, runs, work, timeout=900))
    # 2 ranks again: FSDP2 from the 4-rank HSDP checkpoints
    last = [_cross(r, FSDP2, "fsdp2_from_hsdp", offline_assets, work,
                   work / f"{r}_hsdp_resumed" / "checkpoint" / f"step-{HALF}", exclude=True) for r in CROSS_RECIPES]
    (work / "two_ranks_last").mkdir()
    res.update(run_many(2, last, work / "two_ranks_last"))
    return res, work


@pytest.mark.parametrize("recipe", list(RECIPE_OVERRIDES))
def test_hsdp_resumes_bitwise_and_equals_fsdp(results, recipe):
    res, work = results
    for kind in ("straight", "half", "resume"):
        assert res[f"{recipe}/hsdp/{kind}"]["ok"], res[f"{recipe}/hsdp/{kind}"]["error"]
    assert res[f"{recipe}/fsdp4/straight"]["ok"], res[f"{recipe}/fsdp4/straight"]["error"]
    straight, resumed = _losses(work, recipe, "hsdp"), _losses(work, recipe, "hsdp", "resumed")
    assert len(straight) == STEPS and all(math.isfinite(x) for x in straight)
    assert resumed == straight, (straight, resumed)  # bitwise
    fsdp = _losses(work, recipe, "fsdp4")
    # the FSDP2 run starts at the checkpoint: steps HALF+1..STEPS
    assert _steps(work, recipe, "fsdp4") == list(range(HALF + 1, STEPS + 1)), fsdp
    assert max(abs(x - y) for x, y in zip(straight[HALF:], fsdp)) <= LOSS_TOL, (straight, fsdp)


@pytest.mark.parametrize("recipe", [*TP_RECIPES, *TP_REFUSED])
def test_tensor_parallel(results, recipe):
    res, work = results
    if recipe in TP_RECIPES:
        for kind in ("straight", "half", "resume"):
            assert res[f"{recipe}/tp/{kind}"]["ok"], res[f"{recipe}/tp/{kind}"]["error"]
        straight, resumed = _losses(work, recipe, "tp"), _losses(work, recipe, "tp", "resumed")
        assert resumed == straight, (straight, resumed)
        assert res[f"{recipe}/tp_from_hsdp/straight"]["ok"], res[f"{recipe}/tp_from_hsdp/straight"]["error"]
        # it continued from step HALF (the HSDP run's weights and optimizer state, resharded)
        assert _steps(work, recipe, "tp_from_hsdp") == list(range(HALF + 1, STEPS + 1))
        assert all(math.isfinite(x) for x in _losses(work, recipe, "tp_from_hsdp"))
    else:
        got = res[f"{recipe}/tp/straight"]
        assert not got["ok"]
        assert "tensor parallelism (parallelism.tensor_parallel_degree = 2) is not supported" in got["error"], got["error"]
        assert not (work / f"{recipe}_tp_straight" / "checkpoint").exists()


@pytest.mark.parametrize("recipe", CROSS_RECIPES)
def test_checkpoints_cross_rank_counts(results, recipe):
    """2-rank FSDP2 -> 4-rank HSDP and 4-rank HSDP -> 2-rank FSDP2: model and optimizer state load
    (DCP reshards them), the step continues from HALF, the loss stays finite; loading the data
    position of another data-parallel size is refused before the model, naming the way out."""
    res, work = results
    assert res[f"{recipe}/fsdp2/half"]["ok"], res[f"{recipe}/fsdp2/half"]["error"]
    for tag in ("hsdp_from_fsdp2", "fsdp2_from_hsdp"):
        assert res[f"{recipe}/{tag}/straight"]["ok"], res[f"{recipe}/{tag}/straight"]["error"]
        assert _steps(work, recipe, tag) == list(range(HALF + 1, STEPS + 1)), tag
        assert all(math.isfinite(x) for x in _losses(work, recipe, tag)), tag
    refused = res[f"{recipe}/hsdp_from_fsdp2_whole/straight"]
    assert not refused["ok"]
    assert "written by 2 data-parallel ranks, this run has" in refused["error"], refused["error"]
    assert "--checkpoint.exclude_from_loading dataloader" in refused["error"]
    assert not (work / f"{recipe}_hsdp_from_fsdp2_whole_straight" / "checkpoint").exists()
