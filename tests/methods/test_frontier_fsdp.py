"""APOLLO, APOLLO-Mini, Muon and SCALE (and APOLLO-Mini on SLTrain's factors) under FSDP2 on CPU (gloo):
1 and 2 sharded ranks must match the unsharded run, with momentum_reset firing, and the optimizer's
own communication (all-reduces, gathers, broadcasts inside ``opt.step``) is counted per rank per step
(docs/methods/frontier-optimizers.md). Same fresh-process pattern as test_parametrized_fsdp.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.rank_workers import build_model, launch_ranks

TINY = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)
STEPS = 5
GLOBAL_BATCH = 4
RESET = {"momentum_reset": {"every": 3, "warmup_steps": 1}}
RECIPES = {
    "apollo": (["apollo", "momentum_reset"], {"apollo": {"rank": 4, "update_proj_gap": 2}, **RESET}),
    "apollo_mini": (["apollo_mini", "momentum_reset"], {"apollo_mini": {"update_proj_gap": 2}, **RESET}),
    "muon": (["muon", "momentum_reset"], {"muon": {"ns_dtype": "float32"}, **RESET}),
    "scale": (["scale", "momentum_reset"], {"scale": {}, **RESET}),
    "sltrain_apollo_mini": (
        ["sltrain", "apollo_mini", "momentum_reset"],
        {"sltrain": {"rank": 4, "delta": 0.1}, "apollo_mini": {"roles": ["B", "A"], "update_proj_gap": 2, "scale": 4.0}, **RESET},
    ),
}


class CommCounter:
    """Bytes this rank sends into the optimizer's collectives during ``opt.step`` (all-reduce and
    broadcast payloads, and the full size of row gathers)."""

    def __init__(self):
        import torch.distributed as dist

        from slimtrain.registry import sharded

        self.bytes = 0
        self.active = False
        counter = self
        for name in ("all_reduce", "broadcast"):
            orig = getattr(dist, name)

            def wrapped(t, *a, _orig=orig, **k):
                if counter.active:
                    counter.bytes += t.numel() * t.element_size()
                return _orig(t, *a, **k)

            setattr(dist, name, wrapped)
        orig_gather = sharded.RowShards.gather_rows

        def gather(self_, local):
            out = orig_gather(self_, local)
            if counter.active and self_.dist:
                counter.bytes += out.numel() * out.element_size()
            return out

        sharded.RowShards.gather_rows = gather


COUNTER = None


def run_recipe(name: str, rank: int, world: int, shard: bool) -> dict[str, torch.Tensor]:
    from torch import nn

    from slimtrain.registry import OptimizerHyper, StepContext, compose
    from slimtrain.registry.tensors import full_tensor

    methods, sections = RECIPES[name]
    comp = compose(methods, sections)
    model = build_model(comp, TINY, world=world, shard=shard, seed_label="fsdp-test")
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-2, weight_decay=0.1))
    counter = COUNTER
    data = torch.randint(0, TINY["vocab_size"], (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1))
    per = GLOBAL_BATCH // world
    local = data[rank * per : (rank + 1) * per]
    losses = []
    for step in range(1, STEPS + 1):
        loss = nn.functional.cross_entropy(model(local).flatten(0, 1), local.roll(-1, 1).flatten())
        loss.backward()
        if counter is not None:
            counter.active = True
        opt.step()
        if counter is not None:
            counter.active = False
        opt.zero_grad()
        comp.after_step(StepContext(step, [model], [opt]))
        losses.append(loss.detach())
    out = {k: full_tensor(v).clone() for k, v in model.state_dict().items()}
    out["_losses"] = torch.stack(losses)
    out["_comm_bytes_per_step"] = torch.tensor(0 if counter is None else counter.bytes / STEPS)
    if counter is not None:
        counter.bytes = 0
    return out


def worker() -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    shard, out_dir = os.environ["SHARD"] == "1", Path(os.environ["OUT_DIR"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    global COUNTER
    COUNTER = CommCounter() if shard else None
    try:
        results = {name: run_recipe(name, rank, world, shard) for name in RECIPES}
        torch.save(results, out_dir / f"rank{rank}.pt")  # every rank: each must hold the same full state
    finally:
        dist.destroy_process_group()


def launch(world: int, shard: bool, out_dir: Path) -> list[dict]:
    return launch_ranks(__file__, world, shard, out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("frontier_fsdp")
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
    for rank_result in shards:
        got = rank_result[recipe]
        for key, want in ref.items():
            if key.startswith("_"):
                continue
            assert got[key].dtype == want.dtype, key
            tol = 0 if want.dtype == torch.int64 else 2e-5
            assert torch.allclose(got[key].float(), want.float(), rtol=tol, atol=tol), (key, (got[key] - want).abs().max())
    mean_loss = torch.stack([r[recipe]["_losses"] for r in shards]).mean(0)
    assert torch.allclose(mean_loss, ref["_losses"], rtol=1e-5, atol=1e-6)
    assert ref["_losses"][1:].min() < ref["_losses"][0], ref["_losses"]  # it trains (one LR for all)


def test_optimizer_communication_per_rank_per_step(runs):
    """What the rules move (fp32 unless stated), from their FSDP patterns; printed for the docs."""
    two = {name: runs["sharded2"][0][name]["_comm_bytes_per_step"].item() for name in RECIPES}
    one = {name: runs["sharded1"][0][name]["_comm_bytes_per_step"].item() for name in RECIPES}
    print("\noptimizer bytes per rank per step (2 ranks):", two)
    d, layers, vocab = TINY["dim"], TINY["n_layers"], TINY["vocab_size"]
    ffn = 96
    # SCALE: only the embedding's column statistics (d numbers); Linear rows are local
    assert two["scale"] == 4 * d
    # Muon: each hidden matrix gathered and its result broadcast (fp32 here: ns_dtype float32)
    hidden = layers * (4 * d * d + 3 * ffn * d)
    assert two["muon"] == 2 * 4 * hidden
    # APOLLO, 7 matrices a layer: the left-side one (w2: 32 x 96) all-reduces R (r x n fp32); the
    # right-side ones' R rows are local. Every matrix all-reduces its limiter norm (one float64).
    # APOLLO-Mini (rank 1, one tensor-wise factor): a right-side R is row-sharded, so its factor's
    # two sums (fp32) are all-reduced too; the left-side factor is local (R is replicated).
    assert two["apollo"] == layers * (4 * 4 * ffn + 7 * 8)
    assert two["apollo_mini"] == layers * (4 * 1 * ffn + 7 * 8 + 6 * 2 * 4)
    assert all(v > 0 for v in two.values())


if __name__ == "__main__":
    worker()
