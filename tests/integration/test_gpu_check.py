"""The prepared GPU check (titan_integration/gpu_check.py) cannot rot: its whole sequence runs here
on CPU at the nano flavor, and its refusals are clear."""

from __future__ import annotations

import json

import pytest

from .helpers import ROOT, python

SCRIPT = str(ROOT / "titan_integration" / "gpu_check.py")


@pytest.mark.integration
def test_cpu_smoke_runs_every_step_and_writes_the_report(tmp_path):
    proc = python(SCRIPT, ["--cpu-smoke", "--out", str(tmp_path)], timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    report = json.loads(next(tmp_path.glob("gpu_check_*.json")).read_text())
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert status == {"recipes_60m": "ok", "speed_1b": "ok", "galore_refresh": "ok", "layers_bf16": "ok",
                      "memory_7b": "skipped: no single-GPU 7b recipe yet (issue 14)"}, status
    rows = {r["recipe"]: r for s in report["steps"] for r in s["rows"]}
    assert {"sltrain", "galore"} <= set(rows) and all(r["status"] == "ok" for r in rows.values())
    md = next(tmp_path.glob("gpu_check_*.md")).read_text()
    assert "| recipes_60m |" in md and "| galore |" in md


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path):
    proc = python(SCRIPT, ["--dry-run", "--out", str(tmp_path)])
    assert proc.returncode == 0
    for needle in ("--flavor 60m", "--flavor 1b", "--compile.enable", "--activation_checkpoint.mode selective",
                   "galore_refresh.py", "parametrized_layers.py --device cuda --dtype bfloat16", "skipped:"):
        assert needle in proc.stdout, needle
    assert not list(tmp_path.iterdir())


def test_a_real_check_without_a_gpu_is_refused_naming_what_is_missing(tmp_path):
    proc = python(SCRIPT, ["--out", str(tmp_path)])
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--cpu-smoke" in proc.stderr


def test_a_budget_too_small_keeps_the_report_of_what_did_not_run(tmp_path):
    proc = python(SCRIPT, ["--cpu-smoke", "--budget", "5", "--out", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("gpu_check_*.json")).read_text())
    assert proc.returncode == 1
    assert [s["status"] for s in report["steps"]][:4] == ["not run: budget spent"] * 4
