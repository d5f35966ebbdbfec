"""Running one recipe through the user's own training command and reading back what it measured.

Each run is ``torchrun ... titan_integration/train.py --job.config_file plugins/<recipe>.toml`` with
the sweep's flavor, steps, batch and learning rate on the command line, so a benchmark measures
exactly what a user would run. The run writes a JSON-lines log (``[slimtrain] loss_log``): one
entry per step (loss, wall time), per validation (loss, perplexity), and one memory breakdown.
A run that fails is kept with its error and the tail of its output; the sweep goes on.

Each run is started in its own session (process group): on ``--timeout`` or Ctrl-C the whole
group - torchrun and every training worker it started - is ended (SIGTERM, then SIGKILL after a
grace period), so no orphan keeps training and writing the run's metrics. ``RunResult.ended``
says why a run ended; Ctrl-C raises ``BenchInterrupted`` carrying the interrupted run's result,
so the caller can still write the tables of the runs that finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class RunSpec:
    recipe: str
    lr: float | None
    flavor: str
    steps: int
    nproc: int
    batch: int
    seq_len: int
    out: Path
    val_freq: int
    val_steps: int
    extra: tuple[str, ...] = ()
    overrides: dict[str, dict] = dataclasses.field(default_factory=dict)  # method -> {key: value}

    @property
    def name(self) -> str:
        return self.recipe if self.lr is None else f"{self.recipe}_lr{self.lr:g}"

    @property
    def folder(self) -> Path:
        return self.out / "runs" / self.name

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len * self.nproc

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
            str(ROOT / "titan_integration" / "train.py"),
            "--job.config_file", str(ROOT / "plugins" / f"{self.recipe}.toml"),
            "--job.dump_folder", str(self.folder),
            "--model.flavor", self.flavor,
            "--training.steps", str(self.steps),
            "--training.local_batch_size", str(self.batch),
            "--training.global_batch_size", "-1",
            "--training.seq_len", str(self.seq_len),
            "--validation.seq_len", str(self.seq_len),
            "--validation.freq", str(self.val_freq),
            "--validation.steps", str(self.val_steps),
            "--checkpoint.no-enable",
            "--metrics.log_freq", "1",
            "--slimtrain.loss_log", str(self.folder / "metrics.jsonl"),
        ]
        if self.lr is not None:
            cmd += ["--optimizer.lr", f"{self.lr:g}"]
        for method, values in self.overrides.items():
            for key, value in values.items():
                cmd += [f"--{method}.{key}", str(value)]
        return cmd + list(self.extra)


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    ok: bool
    error: str = ""
    wall_s: float = 0.0
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    step_times: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    val: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)  # step, loss, ppl
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    ended: str = "finished"  # finished | failed (exit code N) | timed out after N s | interrupted (Ctrl-C)

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else math.nan

    @property
    def val_perplexity(self) -> float:
        return self.val[-1][2] if self.val else math.nan

    @property
    def val_loss(self) -> float:
        return self.val[-1][1] if self.val else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Steady state: from the first quarter of the steps on (compile and warm-up excluded)."""
        if len(self.step_times) < 3:
            return math.nan
        start = max(1, len(self.step_times) // 4)
        (s0, t0), (s1, t1) = self.step_times[start - 1], self.step_times[-1]
        return (s1 - s0) * self.spec.tokens_per_step / (t1 - t0) if t1 > t0 else math.nan


def read_metrics(path: Path, result: RunResult) -> None:
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "memory" in entry:
            result.memory = entry["memory"]
        elif "val_loss" in entry:
            result.val.append((entry["step"], entry["val_loss"], entry["val_perplexity"]))
        elif "loss" in entry:
            result.losses.append((entry["step"], entry["loss"]))
            if "time" in entry:
                result.step_times.append((entry["step"], entry["time"]))


GRACE_S = 10.0  # from SIGTERM to SIGKILL when a run's process group is ended


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: its process group was ended; ``result`` is what it had measured."""

    def __init__(self, result: "RunResult") -> None:
        super().__init__("interrupted")
        self.result = result


def end_process_group(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """End ``proc`` and everything in its process group: SIGTERM, then SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; workers of the same group may linger a moment
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(spec: RunSpec, *, timeout_s: float | None = None) -> RunResult:
    spec.folder.mkdir(parents=True, exist_ok=True)
    metrics = spec.folder / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    log_path = spec.folder / "train.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    ended, interrupted = "finished", False
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(spec.command()) + "\n")
        log.flush()
        proc = subprocess.Popen(spec.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            end_process_group(proc)
            rc, ended = -9, f"timed out after {timeout_s:g} s (--timeout); its processes were ended"
        except KeyboardInterrupt:
            end_process_group(proc)
            rc, ended, interrupted = -2, "interrupted (Ctrl-C); its processes were ended", True
        else:
            if rc != 0:
                ended = f"failed (exit code {rc})"
    result = RunResult(spec, ok=(rc == 0), wall_s=time.monotonic() - start, ended=ended)
    read_metrics(metrics, result)
    if rc != 0:
        tail = log_path.read_text().splitlines()[-400:]
        # the run's own error, not torchrun's wrapper around it (ChildFailedError comes last)
        errors = [ln for ln in tail if ("Error" in ln or "error:" in ln) and "torch.distributed.elastic" not in ln
                  and not ln.lstrip().startswith("raise ")]
        if rc in (-9, -2):
            result.error = ended
        else:
            result.error = (errors[-1].strip() if errors else ended)[:500]
    elif not result.losses:
        result.ok, result.error = False, "the run wrote no loss"
    if interrupted:
        raise BenchInterrupted(result)
    return result
