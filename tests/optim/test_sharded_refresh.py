"""The randomized refresh under FSDP2-style row sharding (gloo, 2 spawned CPU ranks): it returns the
unsharded refresh's basis on every rank, and no collective it runs carries a gradient-sized
matrix (only thin m x l / l x n ones, and for a tall gradient on the Gram path the n x n ``G^T G``,
n < m), i.e. the gradient is never gathered.

The ranks are fresh processes launched like the FSDP2 equality tests' (tests/rank_workers.py: one
thread each, a TCP store), and every rank waits at a barrier before tearing the group down: a CI run
saw rank 0 abort in teardown ("terminate called without an active exception") when it was spawned
with torch.multiprocessing and a file store and left the group while its peer was still in it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.rank_workers import launch_ranks

SHAPES = [(40, 24), (24, 40)]
RANK, POWER_ITERS = 5, 2


def _gradient(shape):
    gen = torch.Generator().manual_seed(7)
    m, n = shape
    return torch.randn(m, 8, generator=gen) @ torch.diag(torch.logspace(0, -2, 8)) @ torch.randn(8, n, generator=gen)


def worker() -> None:
    rank, world, out_dir = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["OUT_DIR"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from slimtrain.registry.sharded import RowShards
        from slimtrain.registry.subspace import randomized_range, std_side

        mesh = init_device_mesh("cpu", (world,))
        out = {}
        for shape in SHAPES:
            rows = RowShards(distribute_tensor(_gradient(shape), mesh, [Shard(0)]))
            moved: list[int] = []  # elements of every full matrix a collective produced
            gather, allreduce = rows.gather_rows, rows.allreduce
            rows.gather_rows = lambda t: moved.append(t.shape[1] * shape[0]) or gather(t)
            rows.allreduce = lambda t: moved.append(t.numel()) or allreduce(t)
            side = std_side(shape)
            out[shape] = (randomized_range(rows, RANK, side, power_iters=POWER_ITERS, seed=3), moved)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return launch_ranks(__file__, 2, True, Path(tmp_path_factory.mktemp("sharded_refresh")) / "ranks")


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide"])
def test_sharded_randomized_refresh_gathers_no_gradient_and_matches_unsharded(sharded, shape):
    from slimtrain.registry.sharded import RowShards
    from slimtrain.registry.subspace import DEFAULT_OVERSAMPLE, gram_is_cheaper, randomized_range, std_side

    single = randomized_range(RowShards(_gradient(shape)), RANK, std_side(shape), power_iters=POWER_ITERS, seed=3)
    m, n = shape
    for result, moved in (r[shape] for r in sharded):
        torch.testing.assert_close(result, single, rtol=0, atol=1e-4)
        assert moved, "the refresh ran no collective: the test would not see a gather"
        width = min(RANK + DEFAULT_OVERSAMPLE, m, n)  # the sketch's columns (default oversampling)
        # thin m x l / n x l products, or (the tall one's Gram path) the n x n G^T G, n < m
        largest = min(m, n) ** 2 if gram_is_cheaper(m, n, width, POWER_ITERS) and m > n else width * max(m, n)
        assert max(moved) <= largest < m * n
    torch.testing.assert_close(sharded[0][shape][0], sharded[1][shape][0], rtol=0, atol=0)


if __name__ == "__main__":
    worker()
