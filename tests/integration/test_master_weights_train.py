"""master_weights_bf16 through the user's training command (run_many runs each training as
titan_integration/train.py does) at the nano flavor: bf16 + int8-correction master weights with AdamW,
with GaLore + 8-bit state + per-layer updates, and with SinkGD train and resume bitwise at 1 and 2
ranks (FSDP2; every variant at both rank counts: in the session's shared launch they cost their
trainings only); a recipe with a step hook that writes weights (ReLoRA's merge) is refused before
the model."""

from __future__ import annotations

import math

import pytest
import torch

from .helpers import RECIPE_OVERRIDES, ROOT, offline_args, read_log
from .shared_launch import planner
from .test_frontier2_train import HALF, STEPS, resume_plan, without_methods

pytestmark = pytest.mark.integration

MEMORY_LAYERS = ["--training.max_norm", "0", "--state_8bit.block_size", "16"]
VARIANTS = {
    "adamw_master": ("full_rank", ["--slimtrain.methods", "master_weights_bf16"]),
    "galore_master_8bit_per_layer": (
        "galore", [*MEMORY_LAYERS, "--slimtrain.methods", "galore,master_weights_bf16,state_8bit,per_layer_updates"]),
    "sinkgd_master": ("sinkgd", ["--slimtrain.methods", "sinkgd,momentum_reset,master_weights_bf16"]),
}


def checkpoint_dtypes(dump_folder) -> dict:
    """Key -> dtype of the newest checkpoint under ``dump_folder`` (DCP metadata; model keys without
    their ``model.`` prefix)."""
    from torch.distributed.checkpoint import FileSystemReader

    steps = sorted((dump_folder / "checkpoint").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    meta = FileSystemReader(str(steps[-1])).read_metadata().state_dict_metadata
    return {k.removeprefix("model."): m.properties.dtype for k, m in meta.items() if hasattr(m, "properties")}


def _plan(assets, work, nproc):
    runs = []
    for name in VARIANTS:
        recipe, extra = VARIANTS[name]
        base = ["--job.config_file", str(ROOT / "plugins" / f"{recipe}.toml"), *offline_args(assets),
                *without_methods(RECIPE_OVERRIDES[recipe]), *extra]
        runs += resume_plan(name, base, work)
    bad = []
    if nproc == 1:
        folder = work / "bad_relora"
        bad.append((folder, "[master_weights_bf16] methods = ", {
            "name": "bad/relora",
            "args": ["--job.config_file", str(ROOT / "plugins" / "relora.toml"), *offline_args(assets),
                     *without_methods(RECIPE_OVERRIDES["relora"]), "--training.steps", "1",
                     "--slimtrain.methods", "lora,lora_merge,momentum_reset,master_weights_bf16",
                     "--job.dump_folder", str(folder)],
        }))
    return runs, bad


@planner("master_weights_train")
def plan(assets, work, nproc):
    runs, bad = _plan(assets, work, nproc)
    return runs + [b[2] for b in bad]


@pytest.mark.launch("master_weights_train")
@pytest.mark.parametrize("nproc", [1, 2], ids=["1rank", "2ranks"])
def test_master_weights_train_and_resume_bitwise(launched, offline_assets, nproc):
    results, tmp_path = launched
    runs, bad = _plan(offline_assets, tmp_path, nproc)
    for run in runs:
        assert results[run["name"]]["ok"], (run["name"], results[run["name"]]["error"])
    for name in VARIANTS:
        a, _ = read_log(tmp_path / f"{name}_straight.jsonl")
        b, _ = read_log(tmp_path / f"{name}_resumed.jsonl")
        assert [e["step"] for e in b] == list(range(1, STEPS + 1)), name
        assert all(math.isfinite(e["loss"]) for e in a), name
        assert [e["loss"] for e in b] == [e["loss"] for e in a], name
        assert len({e["loss"] for e in a}) == STEPS, (name, a)  # the weights moved every step
        stored = checkpoint_dtypes(tmp_path / f"{name}_resumed")
        assert stored["tok_embeddings.weight"] == torch.bfloat16, name  # the layer stored the weights ...
        corrections = [k for k in stored if k.endswith(".master_correction")]
        assert corrections and all(stored[k] == torch.int8 for k in corrections), name  # ... and the corrections
    for folder, message, run in bad:
        res = results[run["name"]]
        assert not res["ok"] and message in res["error"], res["error"]
        assert not folder.exists(), folder  # refused before anything was built or written
