"""The per-rank memory model (registry/parallel_memory.py, ``slimtrain memory --device --dp-shard
--dp-replicate --tp``): how each degree divides each category. The bytes of real HSDP shards are
checked in tests/methods/test_hsdp_equality.py (test_rank_memory_model_matches_the_shards)."""

from __future__ import annotations

import json

import pytest

SHAPE = dict(dim=512, ffn=1376, layers=8, heads=8, vocab=32000, seq_len=256, ac="none")


def _model(methods, sections, degrees, batch=16):
    from slimtrain.registry import compose, llama_dense_specs
    from slimtrain.registry.parallel_memory import rank_memory

    dense = llama_dense_specs(512, 1376, 8, 32000, 8)
    return rank_memory(compose(methods, sections), dense, degrees=degrees, batch=batch, **SHAPE)


def test_one_rank_is_the_device_model():
    from slimtrain.registry import compose, llama_dense_specs
    from slimtrain.registry.device_memory import device_memory
    from slimtrain.registry.parallel_memory import Degrees

    m = _model(["galore"], {"galore": {"rank": 128}}, Degrees())
    d = device_memory(compose(["galore"], {"galore": {"rank": 128}}), llama_dense_specs(512, 1376, 8, 32000, 8),
                      batch=16, **SHAPE)
    assert (m.weights, m.gradients, m.optimizer, m.activations, m.peak, m.fsdp_buffers) == (
        d.weights, d.gradients, d.optimizer, d.activations, d.peak, 0)


def test_each_degree_divides_what_it_shards():
    from slimtrain.registry.parallel_memory import Degrees

    one = _model(["adamw"], {}, Degrees())
    fsdp = _model(["adamw"], {}, Degrees(dp_shard=4))
    hsdp = _model(["adamw"], {}, Degrees(dp_shard=2, dp_replicate=2))
    tp = _model(["adamw"], {}, Degrees(dp_shard=2, tp=2))
    # FSDP divides weights, gradients and AdamW's row-laid-out moments; the batch splits too
    assert fsdp.weights == pytest.approx(one.weights / 4, rel=1e-6)
    assert fsdp.optimizer == pytest.approx(one.optimizer / 4, rel=1e-6)
    assert fsdp.local_batch == 4 and fsdp.fsdp_buffers > 0
    # replication divides the batch, not the state: 2 x 2 holds half of the weights, a quarter of the batch
    assert hsdp.weights == pytest.approx(one.weights / 2, rel=1e-6)
    assert hsdp.activations == fsdp.activations
    # TP divides the 2-D weights further (norms are replicated) and every activation
    assert one.weights / 4 < tp.weights < one.weights / 4 * 1.01
    assert tp.activations == pytest.approx(_model(["adamw"], {}, Degrees(dp_shard=2)).activations / 2, rel=1e-6)
    assert fsdp.peak < one.peak and hsdp.peak < one.peak


def test_replicated_state_is_whole_on_every_rank():
    """GaLore's projections and left-side moments are laid out ``replicate``: FSDP does not divide them."""
    from slimtrain.registry.parallel_memory import Degrees

    galore = {"galore": {"rank": 128}}
    one = _model(["galore"], galore, Degrees())
    four = _model(["galore"], galore, Degrees(dp_shard=4))
    assert one.optimizer / 4 < four.optimizer < one.optimizer


def test_batch_must_divide():
    from slimtrain.registry import ConfigError
    from slimtrain.registry.parallel_memory import Degrees

    with pytest.raises(ConfigError, match=r"batch = 16 sequences is not divisible by dp_shard x dp_replicate = 3 x 2 = 6"):
        _model(["adamw"], {}, Degrees(dp_shard=3, dp_replicate=2))
    with pytest.raises(ConfigError, match=r"tp = 0"):
        Degrees(tp=0)


def test_memory_cli_per_rank(capsys):
    from slimtrain.bench.memory import main

    assert main(["--device", "--flavor", "60m", "--recipes", "full_rank,sltrain", "--batch", "16",
                 "--dp-shard", "2", "--dp-replicate", "2", "--tp", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["recipe"] for r in rows] == ["full_rank", "sltrain"]
    assert all(r["local_batch"] == 4 and (r["dp_shard"], r["dp_replicate"], r["tp"]) == (2, 2, 2) for r in rows)
    assert main(["--device", "--flavor", "60m", "--recipes", "full_rank", "--batch", "16", "--dp-shard", "3"]) == 2
    assert "dp_shard x dp_replicate = 3 x 1 = 3" in capsys.readouterr().err
