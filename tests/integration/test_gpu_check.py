"""The prepared GPU check (slimtrain/gpu_check.py) cannot rot: its whole sequence runs here
on CPU at the nano flavor, and its refusals are clear."""

from __future__ import annotations

import json

import pytest

from .helpers import ROOT, python

SCRIPT = str(ROOT / "slimtrain" / "gpu_check.py")


@pytest.mark.integration
def test_cpu_smoke_runs_every_step_and_writes_the_report(tmp_path):
    proc = python(SCRIPT, ["--cpu-smoke", "--out", str(tmp_path)], timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    report = json.loads(next(tmp_path.glob("gpu_check_*.json")).read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert list(status) == ["recipes_60m", "speed_1b", "galore_refresh", "layers_bf16", "quant8_step", "memory_7b_model", "memory_7b",
                            "mesh_2d"]
    assert status.pop("mesh_2d").startswith("skipped: needs 4 GPUs for HSDP 2 x 2, this machine has 0")
    assert set(status.values()) == {"ok"}, status
    rows = {(s["name"], r["recipe"]): r for s in report["steps"] for r in s["rows"]}
    assert set(rows) == {("recipes_60m", "sltrain_restarts"), ("recipes_60m", "galore"), ("speed_1b", "galore"),
                         ("speed_1b", "apollo_mini"), ("memory_7b", "sltrain_7b_single_gpu")}, set(rows)
    for key, r in rows.items():
        assert r["status"] == "ok" and r["final_train_loss"] > 0 and r["tokens_per_s"] > 0, (key, r)
        assert (r["val_loss"] is None) == (key[0] != "recipes_60m"), (key, r)  # validation only at 60m
    assert rows[("memory_7b", "sltrain_7b_single_gpu")]["peak_memory_gib"] > 0
    md = next(tmp_path.glob("gpu_check_*.md")).read_text()
    assert "| recipes_60m |" in md and "| galore |" in md and "| sltrain_7b_single_gpu | sltrain + apollo_mini" in md


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path):
    proc = python(SCRIPT, ["--dry-run", "--out", str(tmp_path)])
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    runs = {ln.split(":")[0].strip(): ln for ln in lines if ln.startswith("    ")}
    recipes = {p.stem for p in (ROOT / "plugins").glob("*.toml")} - {"sltrain_7b_single_gpu"}
    sixty = [ln for ln in lines if "bench_60m/runs/" in ln]
    assert {ln.split(":")[0].strip() for ln in sixty} == recipes  # every recipe at 60m, compiled
    assert all("--model.flavor 60m" in ln and "--compile.enable" in ln and "--galore.update_proj_gap 10" in ln
               for ln in sixty)
    speed = [ln for ln in lines if "bench_1b/runs/" in ln]
    assert [ln.split(":")[0].strip() for ln in speed] == [
        "full_rank", "galore", "fira", "low_rank", "sltrain", "apollo", "apollo_mini", "muon", "scale", "sltrain_apollo_mini"]
    assert all("--model.flavor 1b" in ln and "--compile.enable --activation_checkpoint.mode selective --validation.no-enable" in ln
               for ln in speed)
    seven = runs["sltrain_7b_single_gpu"]
    assert "--model.flavor 7b" in seven and "--training.local_batch_size 16" in seven and "--sltrain.rank" not in seven
    for needle in ("galore_refresh.py", "parametrized_layers.py --device cuda --dtype bfloat16",
                   "quant8_step_time.py --flavors 60m,1b --rounds 7 --device cuda --profile --out",
                   "memory --flavor 7b --recipes plugins/sltrain_7b_single_gpu.toml --device --batch 16 --seq-len 256 --ac full"):
        assert needle in proc.stdout, needle
    assert [ln.split(":")[0][2:] for ln in lines if ln.startswith("# ")] == [
        "recipes_60m", "speed_1b", "galore_refresh", "layers_bf16", "quant8_step", "memory_7b_model", "memory_7b", "mesh_2d"]
    # the 2-D mesh step: 4 processes, HSDP 2 x 2 at 60m, compiled, hooks inside the run
    assert "--nproc-per-node=4" in proc.stdout
    mesh = [ln for ln in lines if "mesh_2d/runs/" in ln]
    assert [ln.split(":")[0].strip() for ln in mesh] == ["galore", "muon", "sltrain"]
    assert all("--model.flavor 60m" in ln and "--compile.enable" in ln and "--parallelism.data_parallel_replicate_degree 2 "
               "--parallelism.data_parallel_shard_degree 2" in ln for ln in mesh)
    assert not list(tmp_path.iterdir())


def test_a_real_check_without_a_gpu_is_refused_naming_what_is_missing(tmp_path):
    proc = python(SCRIPT, ["--out", str(tmp_path)])
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--cpu-smoke" in proc.stderr


def test_a_budget_too_small_keeps_the_report_of_what_did_not_run(tmp_path):
    proc = python(SCRIPT, ["--cpu-smoke", "--budget", "5", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("gpu_check_*.json")).read_text())
    assert proc.returncode == 1
    status = [s["status"] for s in report["steps"]]
    assert status[:7] == ["not run: budget spent"] * 7  # recipes_60m ... memory_7b, quant8_step among them
    assert status[7].startswith("skipped: needs 4 GPUs")  # the 2-D mesh step is skipped before the budget counts


def test_the_7b_run_is_skipped_with_a_note_when_the_memory_model_says_it_does_not_fit(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    from slimtrain import gpu_check

    model = tmp_path / "memory_7b_model.txt"
    model.write_text("| recipe | methods | total |\n|---|---|---|\n"
                     "| sltrain_7b_single_gpu | sltrain + apollo_mini + state_8bit + per_layer_updates | 7.36 |\n")
    assert gpu_check._model_total_gb(model.read_text()) == 7.36
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=6e9))
    assert gpu_check._fits_this_gpu(model) == "does not fit: the memory model says 7.36 GB, this GPU has 6.0 GB"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=141e9))
    assert gpu_check._fits_this_gpu(model) == ""


def test_a_check_without_torchtitan_names_the_wheels(monkeypatch, tmp_path):
    import importlib.util

    from slimtrain import gpu_check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchtitan" else real(name, *a))
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # no .whl folder here
    problems = gpu_check.check_environment(smoke=True, data_dir=None)
    assert len(problems) == 1 and "torchtitan is not importable and there is no .whl folder" in problems[0]
    assert "prepare-wheels.sh" in problems[0]
    (tmp_path / ".whl").mkdir()
    assert "no .whl folder" not in gpu_check.check_environment(smoke=True, data_dir=None)[0]
