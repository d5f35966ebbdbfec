"""Which DTensor layouts ``RowShards`` takes (registry/sharded.py): rows sharded along exactly one mesh
dimension and replicated along the others (FSDP2, HSDP); tensor parallelism's layouts are refused
(and refused before the model by titan_integration/parallel_checks.py)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "placements,expected",
    [
        (("S0",), 0),  # FSDP2
        (("R", "S0"), 1),  # HSDP: replicate x shard
        (("S0", "R"), 0),
        (("S1",), None),  # row-wise TP alone: columns
        (("S0", "S1"), None),  # FSDP x row-wise TP
        (("S0", "S0"), None),  # FSDP x column-wise TP (rows sharded twice)
        (("R", "R"), None),
        (("P", "S0"), None),  # a partial sum is not a gradient yet
    ],
)
def test_row_shard_mesh_dim(placements, expected):
    from torch.distributed.tensor import Partial, Replicate, Shard

    from slimtrain.registry.sharded import row_shard_mesh_dim

    make = {"S0": Shard(0), "S1": Shard(1), "R": Replicate(), "P": Partial()}
    assert row_shard_mesh_dim(tuple(make[p] for p in placements)) == expected
