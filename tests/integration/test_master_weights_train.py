"""master_weights_bf16 through the user's training command (run_many runs each training as
titan_integration/train.py does) at the nano flavor: bf16 + int8-correction master weights with AdamW,
with GaLore + 8-bit state + per-layer updates, and with SinkGD train and resume bitwise at 1 and 2
ranks (FSDP2; by default AdamW and SinkGD at 1 rank, the GaLore composition at 2, about a minute
on 2 loaded cores; the rest of the matrix with ``-m slow``: all of it passed on 2026-12-06); a recipe with a step hook that writes weights (ReLoRA's merge) is refused before
the model."""

from __future__ import annotations

import math

import pytest
import torch

from .helpers import RECIPE_OVERRIDES, ROOT, offline_args, read_log, run_many
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


#: which variants each rank count runs by default (the whole matrix: ``-m slow``); kept cheap for CI
DEFAULT = {1: ["adamw_master", "sinkgd_master"], 2: ["galore_master_8bit_per_layer"]}


@pytest.mark.parametrize("nproc,variants", [
    pytest.param(1, DEFAULT[1], id="1rank"),
    pytest.param(2, DEFAULT[2], id="2ranks"),
    pytest.param(1, [v for v in VARIANTS if v not in DEFAULT[1]], id="1rank-rest", marks=pytest.mark.slow),
    pytest.param(2, [v for v in VARIANTS if v not in DEFAULT[2]], id="2ranks-rest", marks=pytest.mark.slow),
])
def test_master_weights_train_and_resume_bitwise(offline_assets, tmp_path, nproc, variants):
    runs = []
    for name in variants:
        recipe, extra = VARIANTS[name]
        base = ["--job.config_file", str(ROOT / "plugins" / f"{recipe}.toml"), *offline_args(offline_assets),
                *without_methods(RECIPE_OVERRIDES[recipe]), *extra]
        runs += resume_plan(name, base, tmp_path)
    bad = []
    if nproc == 1 and variants == DEFAULT[1]:
        folder = tmp_path / "bad_relora"
        bad.append((folder, "[master_weights_bf16] methods = ", {
            "name": "bad/relora",
            "args": ["--job.config_file", str(ROOT / "plugins" / "relora.toml"), *offline_args(offline_assets),
                     *without_methods(RECIPE_OVERRIDES["relora"]), "--training.steps", "1",
                     "--slimtrain.methods", "lora,lora_merge,momentum_reset,master_weights_bf16",
                     "--job.dump_folder", str(folder)],
        }))
    results = run_many(nproc, runs + [b[2] for b in bad], tmp_path, timeout=900)
    for run in runs:
        assert results[run["name"]]["ok"], (run["name"], results[run["name"]]["error"])
    for name in variants:
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
