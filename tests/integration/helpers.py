"""Helpers for the torchtitan integration tests (CPU, torchrun subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
FAULT_ENV = "SLIMTRAIN_FAULT_NAN_AT_STEP"

from . import titan_assets as assets

# Every recipe, with the overrides that fit the "nano" flavor (dim 32) and make periodic hooks
# fire within a few steps.
RECIPE_OVERRIDES: dict[str, list[str]] = {
    "full_rank": [],
    "low_rank": ["--low_rank.rank", "8"],
    "lora": ["--lora.rank", "8"],
    "relora": ["--lora.rank", "8", "--lora_merge.every", "2", "--momentum_reset.every", "2",
               "--momentum_reset.warmup_steps", "2"],
    "galore": ["--galore.rank", "8", "--galore.update_proj_gap", "2"],
    "fira": ["--fira.rank", "8", "--fira.update_proj_gap", "2"],
    "sltrain": ["--sltrain.rank", "8"],
    "sltrain_restarts": ["--sltrain.rank", "8", "--refactorization.every", "2", "--momentum_reset.every", "2"],
    "low_rank_restarts": ["--low_rank.rank", "8", "--refactorization.every", "2", "--momentum_reset.every", "2"],
    "apollo": ["--apollo.rank", "8", "--apollo.update_proj_gap", "2", "--slimtrain.methods", "apollo,momentum_reset",
               "--momentum_reset.every", "2"],
    "apollo_mini": ["--apollo_mini.update_proj_gap", "2"],
    "muon": ["--slimtrain.methods", "muon,momentum_reset", "--momentum_reset.every", "2"],
    "scale": ["--slimtrain.methods", "scale,momentum_reset", "--momentum_reset.every", "2"],
    "sltrain_apollo_mini": ["--sltrain.rank", "8", "--apollo_mini.update_proj_gap", "2"],
    "sinkgd": ["--slimtrain.methods", "sinkgd,momentum_reset", "--momentum_reset.every", "2"],
    "stable_spam": ["--stable_spam.total_T", "6", "--momentum_reset.every", "2"],
    "adam_mini": ["--slimtrain.methods", "adam_mini,momentum_reset",
                  "--momentum_reset.every", "2"],
}


def make_offline_assets(root: Path) -> dict[str, Path]:
    """A tiny jsonl text folder, a 512-token tokenizer, and one with more tokens than "nano" embeds."""
    text, tok = assets.make_assets(root)
    big = assets.make_tokenizer(root / "big_tokenizer", text, vocab_size=512)
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(big / "tokenizer.json"))
    t.add_tokens([f"<extra_{i}>" for i in range(4200)])
    t.save(str(big / "tokenizer.json"))
    return {"text": text, "tokenizer": tok, "big_tokenizer": big}


def offline_args(a: dict[str, Path], seq_len: int = 64) -> list[str]:
    """Small CPU settings on the offline assets (torchtitan's c4_test local-folder loader)."""
    return [
        "--model.flavor", "nano",
        "--training.local_batch_size", "4", "--training.global_batch_size", "-1",
        "--training.seq_len", str(seq_len),
        "--training.dataset", "c4_test", "--training.dataset_path", str(a["text"]),
        "--validation.dataset", "c4_test", "--validation.dataset_path", str(a["text"]),
        "--validation.seq_len", str(seq_len), "--validation.local_batch_size", "4",
        "--validation.freq", "4", "--validation.steps", "1",
        "--model.hf_assets_path", str(a["tokenizer"]),
        "--checkpoint.interval", "2", "--metrics.log_freq", "1",
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.pop(FAULT_ENV, None)
    return e


def torchrun_cmd(nproc: int, script: str, args: list[str]) -> list[str]:
    return [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), script, *args]


def torchrun(nproc: int, script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, script, args), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a script without torchrun (enough for runs that must fail before torch.distributed starts)."""
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def run_many_cmd(nproc: int, runs: list[dict], workdir: Path) -> tuple[list[str], Path]:
    """The torchrun command of one run_many launch of ``runs`` (its plan written to workdir/plan.json),
    and the file its results go to."""
    plan = workdir / "plan.json"
    results = workdir / "results.json"
    plan.write_text(json.dumps({"results": str(results), "runs": runs}))
    return torchrun_cmd(nproc, str(HERE / "run_many.py"), [str(plan)]), results


def run_many(nproc: int, runs: list[dict], workdir: Path, timeout: int = 600) -> dict[str, dict]:
    cmd, results = run_many_cmd(nproc, runs, workdir)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    (workdir / "run_many.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and results.exists(), (proc.stdout + proc.stderr)[-6000:]
    return {r["name"]: r for r in json.loads(results.read_text())}


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(train entries, validation entries) of a [slimtrain] loss_log file."""
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if "loss" in e], [e for e in entries if "val_loss" in e]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_runs(base: list[str], root: Path, steps: int, half: int) -> list[dict]:
    """run_many entries for a bitwise-resume check: ``straight`` (all steps in one go) and ``half``
    then ``resume`` in one dump folder (stopped at ``half`` with the schedule of ``steps``, then
    resumed); their loss logs are ``root/straight.jsonl`` and ``root/resumed.jsonl``."""
    straight, resumed = root / "straight", root / "resumed"
    return [
        {"name": "straight", "args": [*base, "--training.steps", str(steps), "--job.dump_folder", str(straight),
                                      "--slimtrain.loss_log", f"{straight}.jsonl"]},
        {"name": "half", "args": [*base, "--training.steps", str(half), "--lr_scheduler.total_steps", str(steps),
                                  "--job.dump_folder", str(resumed), "--slimtrain.loss_log", f"{resumed}.jsonl"]},
        {"name": "resume", "args": [*base, "--training.steps", str(steps), "--job.dump_folder", str(resumed),
                                    "--slimtrain.loss_log", f"{resumed}.jsonl"]},
    ]
