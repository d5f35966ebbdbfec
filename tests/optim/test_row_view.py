"""The layout a row-based rule sees a tensor-parallel weight in (slimtrain.registry.sharded.row_placements);
the 4-rank equality of every rule on it: tests/methods/test_hsdp_equality.py."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from slimtrain.registry.sharded import RowShards, row_placements


@pytest.mark.parametrize(
    "placements,expected",
    [
        ((_StridedShard(0, split_factor=2), Shard(0)), (Shard(0), Replicate())),  # column-wise TP + FSDP2
        ((Shard(0), Shard(1)), (Shard(0), Replicate())),  # row-wise TP + FSDP2
        ((Replicate(), _StridedShard(0, split_factor=2), Shard(0)), (Replicate(), Shard(0), Replicate())),  # HSDP + TP
        ((Shard(0), Replicate()), (Shard(0), Replicate())),  # a norm under TP: already rows
        ((Replicate(), Shard(0)), (Replicate(), Shard(0))),  # HSDP: unchanged
        ((Shard(1),), (Replicate(),)),  # TP alone, row-wise: whole on every rank
    ],
    ids=["colwise", "rowwise", "hsdp-tp", "norm", "hsdp", "tp-only-rowwise"],
)
def test_row_placements(placements, expected):
    assert row_placements(placements) == expected


def test_row_shards_of_a_plain_tensor_is_unsharded():
    g = torch.randn(6, 4)
    rows = RowShards(g)
    assert not rows.dist and rows.rows == 6 and torch.equal(rows.local, g)
