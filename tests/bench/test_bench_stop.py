"""``slimtrain bench`` ends a run's whole process group on --timeout and Ctrl-C, says why a run
ended, and still writes the tables of the runs that finished (slimtrain/bench/runner.py, cli.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from slimtrain.bench import cli as bench_cli
from slimtrain.bench import runner

# A stand-in for torchrun: starts a "worker" child that keeps appending to the run's metrics file
# (as an orphaned training worker did), writes both pids, and waits.
FAKE_LAUNCHER = r"""
import subprocess, sys, time
folder = sys.argv[1]
worker = subprocess.Popen([sys.executable, "-c",
    "import json, sys, time\n"
    "step = 0\n"
    "while True:\n"
    "    step += 1\n"
    "    open(sys.argv[1] + '/metrics.jsonl', 'a').write(json.dumps({'step': step, 'loss': 1.0, 'time': time.time()}) + '\n')\n"
    "    time.sleep(0.05)\n", folder])
open(folder + "/pids", "w").write(f"{worker.pid}\n")
time.sleep(600)
"""


def _spec(tmp_path: Path, name: str) -> runner.RunSpec:
    spec = runner.RunSpec(name, None, "nano", 2, 1, 2, 32, tmp_path, 1, 1)
    script = tmp_path / "launcher.py"
    script.write_text(FAKE_LAUNCHER)
    spec.command = lambda: [sys.executable, str(script), str(spec.folder)]  # type: ignore[method-assign]
    return spec


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_for_pid(folder: Path) -> int:
    for _ in range(200):
        if (folder / "pids").exists() and (folder / "pids").read_text().endswith("\n"):
            return int((folder / "pids").read_text())
        time.sleep(0.05)
    raise AssertionError("the fake launcher did not start")


def test_timeout_ends_the_whole_process_group_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "GRACE_S", 2.0, raising=False)
    spec = _spec(tmp_path, "slow")
    result = runner.run(spec, timeout_s=4)
    worker = _wait_for_pid(spec.folder)
    assert not result.ok and result.ended.startswith("timed out after 4 s"), result.ended
    assert "timed out" in result.error
    time.sleep(0.3)
    assert not _alive(worker), "the training worker outlived the timeout"
    metrics = spec.folder / "metrics.jsonl"
    size = metrics.stat().st_size if metrics.exists() else 0
    time.sleep(0.5)
    assert (metrics.stat().st_size if metrics.exists() else 0) == size  # nobody writes the run's metrics


def test_ctrl_c_ends_the_run_and_the_finished_runs_tables_are_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "GRACE_S", 2.0, raising=False)
    out = tmp_path / "bench"
    real_run = runner.run
    calls = []

    def run(spec, timeout_s=None):
        calls.append(spec.name)
        if len(calls) == 1:  # the first recipe finishes
            return runner.RunResult(spec, ok=True, losses=[(1, 2.5), (2, 2.0)])
        fake = _spec(tmp_path, spec.recipe)
        fake.out = out
        timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        try:
            return real_run(fake, timeout_s=None)
        finally:
            timer.cancel()
            pids.append(_wait_for_pid(fake.folder))

    pids: list[int] = []
    monkeypatch.setattr(runner, "run", run)
    rc = bench_cli.main(["--recipes", "full_rank,sltrain,galore", "--flavor", "nano", "--steps", "2",
                         "--out", str(out)])
    assert rc == 130
    assert calls == ["full_rank", "sltrain"]  # galore never started
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["recipe"], r["status"]) for r in rows] == [("full_rank", "ok")]
    time.sleep(0.3)
    assert pids and not _alive(pids[0]), "the interrupted run's worker kept running"
