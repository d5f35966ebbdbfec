"""SinkGD, Stable-SPAM and Adam-mini under FSDP2 on CPU (gloo), with momentum_reset firing: 1 and 2
sharded ranks equal the unsharded run; and composed with state_8bit and per_layer_updates: per-layer
updates equal the plain step (unsharded, and sharded at 1 and 2 ranks up to 8-bit code flips), 8-bit
state tracks full precision (SinkGD declares no state: there 8-bit applies to the AdamW moments of
the embedding and head, per-layer updates to every parameter). Fresh processes, as
tests/optim/test_per_layer_updates.py.
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
LR = 1e-2
RESET = {"momentum_reset": {"every": 3, "warmup_steps": 1}}
RECIPES = {
    "sinkgd": (["sinkgd", "momentum_reset"], {"sinkgd": {}, **RESET}),
    "stable_spam": (["stable_spam", "momentum_reset"],
                    {"stable_spam": {"gamma1": 0.7, "gamma2": 0.9, "total_T": STEPS}, **RESET}),
    "adam_mini": (["adam_mini", "momentum_reset"], {"adam_mini": {"head_dim": 8}, **RESET}),
}
STATEFUL = tuple(RECIPES)
# (recipe, variant): "plain", "8bit" (state_8bit), "8bit_per_layer" (state_8bit + per_layer_updates)
UNSHARDED = [(r, "plain") for r in RECIPES] + [(r, v) for r in STATEFUL for v in ("8bit", "8bit_per_layer")]
SHARDED = [(r, "plain") for r in RECIPES] + [(r, "8bit_per_layer") for r in STATEFUL]


def run_recipe(name: str, variant: str, rank: int, world: int, shard: bool) -> dict[str, torch.Tensor]:
    from torch import nn

    from slimtrain.plugins.per_layer_updates import PerLayerStepper
    from slimtrain.plugins.state_8bit import install_codec
    from slimtrain.registry import OptimizerHyper, StepContext, compose
    from slimtrain.registry.tensors import full_tensor

    methods, sections = RECIPES[name]
    methods, sections = list(methods), dict(sections)
    if "8bit" in variant:
        methods.append("state_8bit")
        sections["state_8bit"] = {"block_size": 16}
    if "per_layer" in variant:
        methods.append("per_layer_updates")
    comp = compose(methods, sections)
    model = build_model(comp, TINY, world=world, shard=shard, seed_label="frontier2-test")
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=LR, weight_decay=0.1))
    if "8bit" in variant:
        install_codec(opt, comp.method("state_8bit").codec())
    stepper = PerLayerStepper(opt, track=True) if "per_layer" in variant else None
    init = {k: full_tensor(v).clone() for k, v in model.state_dict().items()}
    data = torch.randint(0, TINY["vocab_size"], (GLOBAL_BATCH, 12), generator=torch.Generator().manual_seed(1))
    per = GLOBAL_BATCH // world
    local = data[rank * per : (rank + 1) * per]
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.cross_entropy(model(local).flatten(0, 1), local.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        comp.after_step(StepContext(opt.global_step, [model], [opt]))
        losses.append(loss.detach())
    out = {k: full_tensor(v).clone() for k, v in model.state_dict().items()}
    out["_losses"] = torch.stack(losses)
    out["_init"] = init
    out["_live"] = torch.tensor(stepper.live_grads_seen if stepper else -1)
    out["_q8"] = torch.tensor(sum(any(k.endswith("_q8") for k in s) for s in opt.state.values()))
    return out


def worker() -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    shard, out_dir = os.environ["SHARD"] == "1", Path(os.environ["OUT_DIR"])
    torch.set_num_threads(1)
    if shard:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        todo = SHARDED if shard else UNSHARDED
        results = {key: run_recipe(*key, rank, world, shard) for key in todo}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        if shard:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("frontier2_fsdp")
    return {
        "unsharded": launch_ranks(__file__, 1, False, base / "unsharded", timeout=900)[0],
        "sharded1": launch_ranks(__file__, 1, True, base / "sharded1", timeout=900),
        "sharded2": launch_ranks(__file__, 2, True, base / "sharded2", timeout=900),
    }


def _same(got: dict, want: dict, tol: float) -> None:
    for key, w in want.items():
        if key.startswith("_"):
            continue
        assert got[key].dtype == w.dtype, key
        assert torch.allclose(got[key].float(), w.float(), rtol=tol, atol=tol), (key, (got[key] - w).abs().max())


def _same_up_to_code_flips(got: dict, want: dict, tol: float = 2e-4, share: float = 2e-3) -> None:
    """As in tests/optim/test_per_layer_updates.py: the reduce-scatter's summation order can move a
    moment across an 8-bit rounding midpoint; at most ``share`` of a tensor's elements beyond ``tol``
    (SinkGD, Adam-mini; Stable-SPAM: see below)."""
    for key, w in want.items():
        if key.startswith("_"):
            continue
        diff = (got[key].float() - w.float()).abs()
        off = int((diff > tol + tol * w.float().abs()).sum())
        assert off <= share * w.numel(), (key, off, w.numel())
        assert float(diff.max()) <= LR * STEPS, (key, float(diff.max()))


def _close_to_how_far_it_moved(got: dict, want: dict, share: float = 0.02) -> None:
    """Stable-SPAM with 8-bit state at 2 ranks: code flips spread further than for the others
    (measured 4 to 8 elements of a 1024 / 3072-element weight beyond 2e-4 after 5 steps: AdaGN scales a
    whole tensor by one factor from an all-reduced norm, so a last-bit difference moves every element
    at once, and a flipped element changes the next gradients of all). Its plain sharded run is equal
    to fp32 rounding and its per-layer 8-bit run to the plain 8-bit one (both tested), so here: each
    weight within ``share`` of how far training moved it."""
    for key, w in want.items():
        if key.startswith("_") or not w.is_floating_point():
            continue
        moved = (w.float() - want["_init"][key].float()).norm()
        assert (got[key].float() - w.float()).norm() <= share * moved + 1e-6, (key, float(moved))


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("world", [1, 2])
def test_sharded_matches_unsharded(runs, recipe, world):
    ref = runs["unsharded"][(recipe, "plain")]
    shards = runs[f"sharded{world}"]
    for rank_result in shards:
        _same(rank_result[(recipe, "plain")], ref, 2e-5)
    mean_loss = torch.stack([r[(recipe, "plain")]["_losses"] for r in shards]).mean(0)
    assert torch.allclose(mean_loss, ref["_losses"], rtol=1e-5, atol=1e-6)
    assert ref["_losses"][1:].min() < ref["_losses"][0], ref["_losses"]  # it trains


@pytest.mark.parametrize("recipe", STATEFUL)
def test_per_layer_with_8bit_equals_the_plain_8bit_step_unsharded(runs, recipe):
    plain, per_layer = runs["unsharded"][(recipe, "8bit")], runs["unsharded"][(recipe, "8bit_per_layer")]
    _same(per_layer, plain, 1e-6)
    assert int(per_layer["_live"]) == 1  # one gradient alive at a time
    assert int(plain["_q8"]) > 0  # the moments were stored in 8 bits


@pytest.mark.parametrize("recipe", STATEFUL)
@pytest.mark.parametrize("world", [1, 2])
def test_per_layer_with_8bit_under_fsdp2_equals_unsharded(runs, recipe, world):
    plain = runs["unsharded"][(recipe, "8bit")]
    for rank_result in runs[f"sharded{world}"]:
        got = rank_result[(recipe, "8bit_per_layer")]
        if recipe == "stable_spam":
            _close_to_how_far_it_moved(got, plain)
        else:
            _same_up_to_code_flips(got, plain)
        assert int(got["_live"]) == 1


@pytest.mark.parametrize("recipe", STATEFUL)
def test_8bit_state_tracks_full_precision(runs, recipe):
    """The 8-bit run differs from the full-precision one by a small part of how far training moved."""
    full, q8 = runs["unsharded"][(recipe, "plain")], runs["unsharded"][(recipe, "8bit")]
    assert int(q8["_q8"]) > 0 and int(full["_q8"]) == 0
    for k, b0 in full["_init"].items():
        if not b0.is_floating_point() or b0.ndim < 2:
            continue
        moved = (full[k] - b0).norm()
        assert moved > 0, k
        assert 0 < (q8[k] - full[k]).norm() < 0.1 * moved, (k, float((q8[k] - full[k]).norm()), float(moved))


if __name__ == "__main__":
    worker()
