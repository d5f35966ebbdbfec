"""Every update rule and parametrized method under HSDP (replicate 2 x shard 2, 4 gloo ranks) equals
the unsharded run, with refreshes, refactorizations, merges and momentum resets inside the window;
and whole-matrix math runs once per matrix per replica group (``OwnerRanks`` / ``RowShards`` use the
shard dimension's group only).

Same fresh-process pattern as test_frontier_fsdp.py (this file is the worker script). The optimizer's
own communication per rank per step is recorded for the docs' HSDP column
(docs/methods/frontier-optimizers.md).
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
REPLICATE = 2
RESET = {"momentum_reset": {"every": 3, "warmup_steps": 1}}
RECIPES = {
    "adamw": (["adamw", "momentum_reset"], {**RESET}),
    "galore_svd": (["galore", "momentum_reset"], {"galore": {"rank": 4, "update_proj_gap": 2, "proj_method": "svd"}, **RESET}),
    "galore": (["galore"], {"galore": {"rank": 4, "update_proj_gap": 2}}),
    "fira": (["fira"], {"fira": {"rank": 4, "update_proj_gap": 2}}),
    "apollo": (["apollo", "momentum_reset"], {"apollo": {"rank": 4, "update_proj_gap": 2}, **RESET}),
    "apollo_mini": (["apollo_mini"], {"apollo_mini": {"update_proj_gap": 2}}),
    "muon": (["muon", "momentum_reset"], {"muon": {"ns_dtype": "float32"}, **RESET}),
    "scale": (["scale", "momentum_reset"], {"scale": {}, **RESET}),
    "state_8bit": (["galore", "state_8bit"], {"galore": {"rank": 4, "update_proj_gap": 2}}),
    "sltrain_lora": (
        ["sltrain", "lora", "refactorization", "lora_merge"],
        {"sltrain": {"rank": 4, "delta": 0.1, "targets": "attention.*"}, "lora": {"rank": 4, "targets": "feed_forward.*"},
         "refactorization": {"every": 2}, "lora_merge": {"every": 3}},
    ),
    "low_rank": (["low_rank", "refactorization", "momentum_reset"],
                 {"low_rank": {"rank": 4, "alpha": 8.0}, "refactorization": {"every": 2}, **RESET}),
    "sltrain_apollo_mini": (
        ["sltrain", "apollo_mini", "momentum_reset"],
        {"sltrain": {"rank": 4, "delta": 0.1}, "apollo_mini": {"roles": ["B", "A"], "update_proj_gap": 2, "scale": 4.0}, **RESET},
    ),
}

#: under FSDP2 x TP 2 (torchtitan's Llama TP plan): every update rule. AdamW runs on the TP shards
#: (elementwise); every other rule on its row view (slimtrain.registry.sharded.row_view)
_FRONTIER2 = {
    "sinkgd": (["sinkgd", "momentum_reset"], {"sinkgd": {}, **RESET}),
    "stable_spam": (["stable_spam", "momentum_reset"],
                    {"stable_spam": {"gamma1": 0.7, "gamma2": 0.9, "total_T": STEPS}, **RESET}),
    "adam_mini": (["adam_mini", "momentum_reset"], {"adam_mini": {"head_dim": 8}, **RESET}),
}
TP_RECIPES = {
    **{f"{k}_tp": RECIPES[k] for k in ("adamw", "galore_svd", "galore", "fira", "apollo", "apollo_mini", "muon", "scale")},
    **{f"{k}_tp": v for k, v in _FRONTIER2.items()},
    # 8-bit state: GaLore's moments (row view) and AdamW's on the TP shards (embedding, norms, output)
    "state_8bit_tp": RECIPES["state_8bit"],
    "adamw_8bit_tp": (["adamw", "state_8bit"], {"state_8bit": {"block_size": 16}}),
    # parametrized methods: factors sharded by the TP plan (titan_integration/tensor_parallel.py)
    "low_rank_tp": RECIPES["low_rank"],
    "relora_tp": (["lora", "lora_merge", "momentum_reset"],
                  {"lora": {"rank": 4}, "lora_merge": {"every": 3}, **RESET}),
    "low_rank_apollo_mini_tp": (
        ["low_rank", "apollo_mini", "momentum_reset"],
        {"low_rank": {"rank": 4, "alpha": 8.0}, "apollo_mini": {"roles": ["B", "A"], "update_proj_gap": 2, "scale": 4.0},
         **RESET},
    ),
}
TP = 2


class SvdCounter:
    """Counts the whole-matrix computations (SVD, Newton-Schulz) THIS rank performs."""

    def __init__(self):
        from slimtrain.plugins import galore, muon

        self.calls = 0
        counter = self
        for module, name in ((galore, "svd_projection"), (muon, "newton_schulz")):
            orig = getattr(module, name)

            def wrapped(*a, _orig=orig, **k):
                counter.calls += 1
                return _orig(*a, **k)

            setattr(module, name, wrapped)


def run_recipe(name: str, rank: int, world: int, shard: bool, counters) -> dict[str, torch.Tensor]:
    from torch import nn

    from slimtrain.registry import OptimizerHyper, StepContext, compose
    from slimtrain.registry.tensors import full_tensor

    methods, sections = {**RECIPES, **TP_RECIPES}[name]
    comp = compose(methods, sections)
    tp = TP if name in TP_RECIPES and shard and world > 1 else 1
    model = build_model(comp, TINY, world=world, shard=shard, seed_label="hsdp-test",
                        replicate=REPLICATE if shard and world > 1 and tp == 1 else 1, tp=tp)
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-2, weight_decay=0.1))
    comm, whole = counters
    data = torch.randint(0, TINY["vocab_size"], (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1))
    dp, dp_rank = world // tp, rank // tp  # the TP ranks of a data-parallel group read the same batch
    per = GLOBAL_BATCH // dp
    local = data[dp_rank * per : (dp_rank + 1) * per]
    losses = []
    whole.calls = 0
    for step in range(1, STEPS + 1):
        loss = nn.functional.cross_entropy(model(local).flatten(0, 1), local.roll(-1, 1).flatten())
        loss.backward()
        if comm is not None:
            comm.active = True
        opt.step()
        if comm is not None:
            comm.active = False
        opt.zero_grad()
        comp.after_step(StepContext(step, [model], [opt]))
        losses.append(loss.detach())
    from slimtrain.registry.tensors import local_tensor

    nbytes = lambda t: local_tensor(t).numel() * local_tensor(t).element_size()  # noqa: E731
    out = {k: full_tensor(v).clone() for k, v in model.state_dict().items()}
    # what this rank holds: its parameter shards and its optimizer state (non-scalar), fp32
    out["_local_param_bytes"] = torch.tensor(sum(nbytes(p) for p in model.parameters()))
    out["_local_state_bytes"] = torch.tensor(sum(nbytes(t) for st in opt.state.values() for t in st.values()
                                                 if torch.is_tensor(t) and t.ndim > 0))
    out["_losses"] = torch.stack(losses)
    out["_comm_bytes_per_step"] = torch.tensor(0 if comm is None else comm.bytes / STEPS)
    out["_whole_matrix_calls"] = torch.tensor(whole.calls)
    out["_placements"] = {k: str(tuple(v.placements)) for k, v in model.named_parameters() if hasattr(v, "placements")}
    if comm is not None:
        comm.bytes = 0
    return out


def count_row_views(comm) -> None:
    """Add to ``comm`` the row views' payload under TP: the local size of each row view the optimizer
    builds (a TP weight and its gradient redistributed to Shard(0) on FSDP's dim, Replicate on TP:
    slimtrain.registry.sharded.row_view). The write-back is not counted (a local slice for row-wise
    weights; a reshuffle of rows within the data-parallel group for column-wise ones)."""
    from slimtrain.registry import sharded

    orig = sharded.row_view

    def row_view(t):
        out = orig(t)
        if comm.active and out is not t:
            local = out.to_local()
            comm.bytes += local.numel() * local.element_size()
        return out

    sharded.row_view = row_view


def worker() -> None:
    import torch.distributed as dist

    from tests.methods.test_frontier_fsdp import CommCounter

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    shard, out_dir = os.environ["SHARD"] == "1", Path(os.environ["OUT_DIR"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counters = (CommCounter() if shard else None, SvdCounter())
    if shard:
        count_row_views(counters[0])
    try:
        results = {name: run_recipe(name, rank, world, shard, counters) for name in (*RECIPES, *TP_RECIPES)}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hsdp")
    return {
        "unsharded": launch_ranks(__file__, 1, False, base / "unsharded")[0],
        "hsdp": launch_ranks(__file__, 4, True, base / "hsdp", timeout=600),
    }


#: fp32 tolerance on every parameter after STEPS steps. Measured 2026-12-06 (2-core CPU, torch
#: 2.13.0+cpu, gloo), largest |HSDP - unsharded| over all parameters and ranks: 1.8e-4 adamw (AdamW on
#: the Linear weights: m / sqrt(v) turns reduction-order noise in near-zero gradient entries into
#: update differences up to lr), 3.1e-5 low_rank (AdamW on the factors, rescaled by refactorization),
#: 2.9e-6 sltrain_apollo_mini, <= 1e-6 every other recipe; mean losses within 7.2e-7 everywhere.
TOL = {"adamw": 4e-4, "low_rank": 1e-4, "sltrain_apollo_mini": 1e-5}
DEFAULT_TOL = 4e-6
#: FSDP2 x TP 2 vs unsharded (same measurement; see test_tensor_parallel_matches_unsharded)
TP_TOL = {"adamw_tp": 4e-4, "stable_spam_tp": 4e-5, "low_rank_tp": 1e-4, "relora_tp": 4e-5,
          "low_rank_apollo_mini_tp": 1e-5, "adamw_8bit_tp": 4e-4}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_hsdp_matches_unsharded(runs, recipe):
    """Every rank of the 2 x 2 HSDP run holds the unsharded run's parameters after STEPS steps within
    TOL (fp32; reduction order differs: FSDP2 reduce-scatters over 2 ranks, then all-reduces over 2
    replicas), and the mean of the ranks' losses is the unsharded loss."""
    ref = runs["unsharded"][recipe]
    for rank_result in runs["hsdp"]:
        got = rank_result[recipe]
        assert set(got) == set(ref)
        for key, want in ref.items():
            if key.startswith("_"):
                continue
            assert got[key].dtype == want.dtype, key
            tol = 0 if want.dtype == torch.int64 else TOL.get(recipe, DEFAULT_TOL)
            assert torch.allclose(got[key].float(), want.float(), rtol=tol, atol=tol), (key, (got[key] - want).abs().max())
    mean_loss = torch.stack([r[recipe]["_losses"] for r in runs["hsdp"]]).mean(0)
    assert torch.allclose(mean_loss, ref["_losses"], rtol=1e-5, atol=1e-6)
    assert ref["_losses"][1:].min() < ref["_losses"][0], ref["_losses"]


@pytest.mark.parametrize("recipe", list(TP_RECIPES))
def test_tensor_parallel_matches_unsharded(runs, recipe):
    """FSDP2 x TP 2 (torchtitan's Llama plan: column-wise wq/wk/wv/w1/w3/output, row-wise wo/w2 and
    the embedding, sequence-parallel norms): AdamW, the one rule that runs on column shards, equals
    the unsharded run within the AdamW tolerance."""
    ref = runs["unsharded"][recipe]
    tol = TP_TOL.get(recipe, DEFAULT_TOL)
    worst = 0.0
    for rank_result in runs["hsdp"]:
        got = rank_result[recipe]
        for key, want in ref.items():
            if key.startswith("_"):
                continue
            worst = max(worst, (got[key].float() - want.float()).abs().max().item())
            assert torch.allclose(got[key].float(), want.float(), rtol=tol, atol=tol), (
                key, (got[key] - want).abs().max())
    print(f"\n{recipe}: largest |FSDP2 x TP2 - unsharded| = {worst:.2e}")
    placed = runs["hsdp"][0][recipe]["_placements"]
    for name, placements in placed.items():
        # the TP plan shards factors too: B (original "B") with W's rows under column-wise wq / w1,
        # A with W's columns under row-wise wo / w2; the other factor replicated over TP
        if name.endswith("wq.parametrizations.weight.original0") and recipe.startswith("low_rank"):
            assert placements == "(_StridedShard(dim=0, sf=2), Shard(dim=0))", (name, placements)
        if name.endswith("wo.parametrizations.weight.original1") and recipe.startswith("low_rank"):
            assert placements == "(Shard(dim=0), Shard(dim=1))", (name, placements)
        if name.endswith("wo.parametrizations.weight.original0") and recipe.startswith("low_rank"):
            assert placements == "(Shard(dim=0), Replicate())", (name, placements)
    if recipe.startswith("low_rank"):
        assert any(n.endswith("wo.parametrizations.weight.original1") for n in placed), sorted(placed)
    # ranks 2k and 2k+1 are one data-parallel rank: the mean over the 2 data-parallel ranks
    dp_losses = torch.stack([r[recipe]["_losses"] for r in runs["hsdp"][::TP]]).mean(0)
    assert torch.allclose(dp_losses, ref["_losses"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["galore_svd", "muon"])
def test_whole_matrix_math_once_per_replica_group(runs, recipe):
    """The exact SVDs / Newton-Schulz iterations of a step are spread over the 2 ranks of a shard
    group: each replica group computes every matrix once (2 groups: twice in all, not 4 times)."""
    calls = [int(r[recipe]["_whole_matrix_calls"]) for r in runs["hsdp"]]
    unsharded = int(runs["unsharded"][recipe]["_whole_matrix_calls"])
    assert unsharded > 0
    assert sum(calls) == REPLICATE * unsharded, (calls, unsharded)
    # ranks 0,1 are replica group 0 and ranks 2,3 group 1 (row-major mesh): each group does it all
    assert calls[0] + calls[1] == unsharded and calls[2] + calls[3] == unsharded, calls


def test_hsdp_communication_per_rank_per_step(runs):
    """What the rules move inside opt.step per rank per step under HSDP (printed for the docs): the
    same as FSDP2 over the shard group's size, never across replicas."""
    got = {name: runs["hsdp"][0][name]["_comm_bytes_per_step"].item() for name in RECIPES}
    print("\nHSDP 2x2 optimizer bytes per rank per step:", got)
    d, layers = TINY["dim"], TINY["n_layers"]
    ffn = 96
    assert got["adamw"] == 0
    assert got["scale"] == 4 * d
    hidden = layers * (4 * d * d + 3 * ffn * d)
    assert got["muon"] == 2 * 4 * hidden


def test_tp_communication_per_rank_per_step(runs):
    """What the optimizer moves inside opt.step per rank per step under FSDP 2 x TP 2 (printed for
    the docs): AdamW nothing (it steps the TP shards); a row-based rule its FSDP2 collectives over the
    data-parallel group of 2 plus its row views (each TP weight and its gradient, ``rows / dp x cols``
    each). SCALE's: its column all-reduce (4 d bytes) plus two row views of every matrix it updates."""
    got = {name: runs["hsdp"][0][name]["_comm_bytes_per_step"].item() for name in TP_RECIPES}
    print("\nFSDP2 x TP2 optimizer bytes per rank per step:", got)
    d, layers, ffn = TINY["dim"], TINY["n_layers"], 96
    hidden = layers * (4 * d * d + 3 * ffn * d)
    assert got["adamw_tp"] == 0
    dp = 4 // TP
    # SCALE also updates the embedding and the output head (vocab x d each, both TP-sharded)
    assert got["scale_tp"] == 4 * d + 2 * 4 * (hidden + 2 * TINY["vocab_size"] * d) / dp
    assert got["low_rank_tp"] == 0  # AdamW on the factors' TP shards


@pytest.mark.parametrize("recipe", ["adamw", "galore", "muon", "sltrain_apollo_mini"])
def test_rank_memory_model_matches_the_shards(runs, recipe):
    """slimtrain memory's per-rank model (registry/parallel_memory.py) at dp_shard 2 x dp_replicate 2
    gives the parameter and optimizer-state bytes each HSDP rank really holds (fp32), within 1%;
    replication divides nothing (every rank of the 2 x 2 mesh holds a half, not a quarter)."""
    from slimtrain.registry import compose, llama_dense_specs
    from slimtrain.registry.parallel_memory import Degrees, rank_memory

    methods, sections = RECIPES[recipe]
    d = TINY
    ffn = 96
    kw = dict(dim=d["dim"], ffn=ffn, layers=d["n_layers"], heads=d["n_heads"], vocab=d["vocab_size"], seq_len=12,
              bytes_per_element=4)
    dense = llama_dense_specs(d["dim"], ffn, d["n_layers"], d["vocab_size"], d["n_heads"])
    one = rank_memory(compose(methods, sections), dense, degrees=Degrees(), batch=4, **kw)
    m = rank_memory(compose(methods, sections), dense, degrees=Degrees(dp_shard=2, dp_replicate=2), batch=4, **kw)
    for rank_result in runs["hsdp"]:
        got = rank_result[recipe]
        assert m.weights == pytest.approx(int(got["_local_param_bytes"]), rel=0.01)
        assert m.optimizer == pytest.approx(int(got["_local_state_bytes"]), rel=0.01)
    assert m.weights == pytest.approx(one.weights / 2, rel=1e-6) and m.local_batch == 1


@pytest.mark.parametrize("recipe", ["adamw_tp", "galore_tp", "muon_tp", "apollo_tp"])
def test_rank_memory_model_under_tp(runs, recipe):
    """The per-rank model at dp_shard 2 x tp 2 gives what each FSDP2 x TP 2 rank holds (fp32), within
    1%: weights divided by 4 (norms by 2), AdamW's rows state by 4 (on the TP shards), a row-based
    rule's rows state by 2 (kept in the row view's layout, replicated over TP)."""
    from slimtrain.registry import compose, llama_dense_specs
    from slimtrain.registry.parallel_memory import Degrees, rank_memory

    methods, sections = TP_RECIPES[recipe]
    d = TINY
    ffn = 96
    kw = dict(dim=d["dim"], ffn=ffn, layers=d["n_layers"], heads=d["n_heads"], vocab=d["vocab_size"], seq_len=12,
              bytes_per_element=4)
    dense = llama_dense_specs(d["dim"], ffn, d["n_layers"], d["vocab_size"], d["n_heads"])
    m = rank_memory(compose(methods, sections), dense, degrees=Degrees(dp_shard=2, tp=TP), batch=4, **kw)
    for rank_result in runs["hsdp"]:
        got = rank_result[recipe]
        assert m.weights == pytest.approx(int(got["_local_param_bytes"]), rel=0.01)
        assert m.optimizer == pytest.approx(int(got["_local_state_bytes"]), rel=0.01)


if __name__ == "__main__":
    worker()
