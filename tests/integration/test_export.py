"""`slimtrain export`: a run's newest checkpoint (SLTrain on the nano flavor, the embedded corpus)
as a dense Hugging Face Llama that transformers loads, with the run's logits and perplexity."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from .helpers import ROOT, env, read_log, torchrun  # noqa: E402
from .shared_launch import planner  # noqa: E402

pytestmark = pytest.mark.integration


def train_args(root: Path, recipe: str, overrides: list[str]) -> list[str]:
    return [
        "--job.config_file", f"plugins/{recipe}.toml", "--model.flavor", "nano", "--training.steps", "12",
        "--checkpoint.interval", "6", "--training.seq_len", "64", "--validation.seq_len", "64",
        "--validation.freq", "12", "--job.dump_folder", str(root / "run"), "--slimtrain.loss_log", str(root / "log.jsonl"),
        *overrides,
    ]


def train(root: Path, recipe: str, overrides: list[str]) -> Path:
    """The user's command itself (the other recipes train in the session's shared launch)."""
    proc = torchrun(1, "titan_integration/train.py", train_args(root, recipe, overrides))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root


def trained(launched) -> Path:
    results, work = launched
    assert results["train"]["ok"], results["train"]["error"]
    return work


RELORA = ["--lora.rank", "8", "--lora_merge.every", "4", "--momentum_reset.every", "4", "--momentum_reset.warmup_steps", "2"]
MASTER = ["--slimtrain.methods", "master_weights_bf16"]


@planner("export_relora")
def plan_relora(assets, work):
    return [{"name": "train", "args": train_args(work, "relora", RELORA)}]


@planner("export_master_weights")
def plan_master_weights(assets, work):
    return [{"name": "train", "args": train_args(work, "full_rank", MASTER)}]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("export_sltrain"), "sltrain", ["--sltrain.rank", "8"])


def export(run_dir, out) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtrain.cli", "export", str(run_dir), str(out)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)


def test_export_loads_with_the_runs_logits_perplexity_and_generates(run):
    check_export(run)


@pytest.mark.launch("export_relora", nproc=1)
def test_export_of_a_relora_run(launched):
    """A recipe with a frozen base (LoRA's W0), merges and momentum resets."""
    check_export(trained(launched))


@pytest.mark.launch("export_master_weights", nproc=1)
def test_export_of_a_master_weights_run_writes_the_restored_fp32_weights(launched):
    """bf16 + int8 correction (master_weights_bf16): the export carries the fp32 weight the layer
    restores from the checkpoint's correction, not the stored bf16 one (which loses the small updates)."""
    import safetensors.torch
    import torch.distributed.checkpoint as dcp

    from slimtrain.plugins.master_weights_bf16 import KEY, restore
    from slimtrain.titan_integration import export as ex

    run = trained(launched)
    check_export(run)
    plan = ex.plan(str(run / "run"), str(run / "unused"))
    name = "layers.0.feed_forward.w1.weight"
    meta = dcp.FileSystemReader(str(plan.checkpoint)).read_metadata().state_dict_metadata
    assert meta[name].properties.dtype == torch.bfloat16
    shape = meta[name].size
    want = {name: torch.empty(shape, dtype=torch.bfloat16), f"optimizer.state.{name}.{KEY}": torch.empty(shape, dtype=torch.int8)}
    dcp.load(want, checkpoint_id=str(plan.checkpoint))
    fp32 = restore(want[name], want[f"optimizer.state.{name}.{KEY}"])
    assert not torch.equal(fp32, want[name].float())  # the correction carries something
    exported = safetensors.torch.load_file(str(run / "hf" / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(exported, fp32)
    info = json.loads((run / "hf" / "slimtrain_export.json").read_text())["master_weights"]
    assert info["method"] == "master_weights_bf16" and info["missing"] == [] and info["restored"] > 0


def check_export(run: Path) -> None:
    from slimtrain.titan_integration import export as ex

    out = run / "hf"
    proc = export(run / "run", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".hf.partial") for p in run.iterdir())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert type(hf).__name__ == "LlamaForCausalLM"

    plan = ex.plan(str(run / "run"), str(run / "unused"))
    assert plan.step == 12  # the newest of step-6 and step-12
    ours, args = ex.load_run_model(plan)
    record = plan.record
    val = np.memmap(Path(record["validation"]["dataset_path"] or record["hf_assets_path"]) / "val.bin",
                    dtype=np.uint16, mode="r")
    v = record["validation"]
    seq, n = v["seq_len"], v["local_batch_size"] * v["steps"]
    windows = torch.stack([torch.from_numpy(val[i * seq: i * seq + seq + 1].astype(np.int64)) for i in range(n)])
    with torch.no_grad():
        theirs = hf(windows[:, :-1]).logits.float()
        mine = ours(windows[:, :-1]).float()
    assert float((mine - theirs).abs().max() / mine.abs().max()) < 1e-4
    loss = torch.nn.functional.cross_entropy(theirs.reshape(-1, theirs.shape[-1]), windows[:, 1:].reshape(-1))
    _, vals = read_log(run / "log.jsonl")
    last = vals[-1]
    assert last["step"] == 12
    assert math.exp(loss.item()) == pytest.approx(last["val_perplexity"], rel=5e-3)

    prompt = tok("The", return_tensors="pt")
    gen = hf.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(gen[0]), str) and len(tok.decode(gen[0])) > 0


def _record_copy(run: Path, tmp_path: Path, **changes) -> Path:
    record = json.loads((run / "run" / "slimtrain_run.json").read_text())
    record.update(changes)
    folder = tmp_path / "copied_run"
    folder.mkdir()
    (folder / "slimtrain_run.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize("case", ["no_checkpoint", "not_llama", "out_exists", "not_a_run"])
def test_bad_input_is_refused_and_nothing_is_written(run, tmp_path, case):
    from slimtrain.titan_integration.export import main

    out = tmp_path / "out"
    if case == "no_checkpoint":
        (tmp_path / "empty").mkdir()
        run_dir, words = _record_copy(run, tmp_path, checkpoint_folder=str(tmp_path / "empty")), "never checkpointed"
    elif case == "not_llama":
        run_dir, words = _record_copy(run, tmp_path, model_name="deepseek_v3"), "not a slimtrain Llama"
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        run_dir, words = run / "run", "exists"
    else:
        run_dir, words = tmp_path, "not a slimtrain run folder"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = export(run_dir, out)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no partial folder
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main is not None
