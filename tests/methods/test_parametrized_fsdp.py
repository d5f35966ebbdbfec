"""Parametrized methods under FSDP2 on CPU (gloo): parametrize on meta, fully_shard, init, train a few
steps with refactorization and a LoRA merge; 1 and 2 ranks must match the unsharded run.

Each configuration runs in fresh processes (this file is also the worker script), so the test needs
no GPU and no torchrun: the parent picks a port and starts one process per rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.rank_workers import build_model, launch_ranks

TINY = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)
STEPS = 4
GLOBAL_BATCH = 4
RECIPES = {
    # sparse + low-rank attention, LoRA MLP, refactorization at steps 2 and 4, a merge at step 3
    "sltrain_lora": (
        ["sltrain", "lora", "refactorization", "lora_merge"],
        {
            "sltrain": {"rank": 4, "delta": 0.1, "targets": "attention.*"},
            "lora": {"rank": 4, "targets": "feed_forward.*"},
            "refactorization": {"every": 2},
            "lora_merge": {"every": 3},
        },
    ),
    "low_rank": (["low_rank", "refactorization"], {"low_rank": {"rank": 4, "alpha": 8.0}, "refactorization": {"every": 2}}),
}


def run_recipe(name: str, rank: int, world: int, shard: bool) -> dict[str, torch.Tensor]:
    from torch import nn

    from slimtrain.registry import OptimizerHyper, StepContext, compose
    from slimtrain.registry.tensors import full_tensor

    methods, sections = RECIPES[name]
    comp = compose(methods, sections)
    model = build_model(comp, TINY, world=world, shard=shard, seed_label="fsdp-test")
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-2))
    data = torch.randint(0, TINY["vocab_size"], (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1))
    per = GLOBAL_BATCH // world
    local = data[rank * per : (rank + 1) * per]
    losses = []
    for step in range(1, STEPS + 1):
        loss = nn.functional.cross_entropy(model(local).flatten(0, 1), local.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        comp.after_step(StepContext(step, [model], [opt]))
        losses.append(loss.detach())
    out = {k: full_tensor(v).clone() for k, v in model.state_dict().items()}
    out["_losses"] = torch.stack(losses)
    return out


def worker() -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    shard, out_dir = os.environ["SHARD"] == "1", Path(os.environ["OUT_DIR"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: run_recipe(name, rank, world, shard) for name in RECIPES}
        torch.save(results, out_dir / f"rank{rank}.pt")  # every rank: each must hold the same full state
    finally:
        dist.destroy_process_group()


def launch(world: int, shard: bool, out_dir: Path) -> list[dict]:
    return launch_ranks(__file__, world, shard, out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    return {
        "unsharded": launch(1, False, base / "unsharded")[0],
        "sharded1": launch(1, True, base / "sharded1"),
        "sharded2": launch(2, True, base / "sharded2"),
    }


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("world", [1, 2])
def test_sharded_matches_unsharded(runs, recipe, world):
    ref = runs["unsharded"][recipe]
    shards = runs[f"sharded{world}"]
    assert set(ref) == set(shards[0][recipe])
    assert any(k.endswith(".index") for k in ref) == (recipe == "sltrain_lora")
    for rank_result in shards:
        got = rank_result[recipe]
        for key, want in ref.items():
            if key == "_losses":
                # each rank saw half the batch: compare the mean over ranks below
                continue
            assert got[key].dtype == want.dtype, key
            tol = 0 if want.dtype == torch.int64 else 2e-5
            assert torch.allclose(got[key].float(), want.float(), rtol=tol, atol=tol), (key, (got[key] - want).abs().max())
    mean_loss = torch.stack([r[recipe]["_losses"] for r in shards]).mean(0)
    assert torch.allclose(mean_loss, ref["_losses"], rtol=1e-5, atol=1e-6)


def test_training_moved_and_restarts_happened(runs):
    ref = runs["unsharded"]["sltrain_lora"]
    losses = ref["_losses"]
    assert losses[-1] < losses[0]
    # LoRA's B was zeroed by the merge at step 3 and trained one step after it
    b = ref["layers.0.feed_forward.w1.parametrizations.weight.original1"]
    assert torch.count_nonzero(b) > 0


if __name__ == "__main__":
    worker()
