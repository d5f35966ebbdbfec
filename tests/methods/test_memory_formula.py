"""Parameter counts and memory estimates of every parametrized method against the analytic formula,
on torchtitan's llama3 Transformer built on the meta device with the paper's shapes, and against the
published memory figures (methods.md, bf16 weights + AdamW moments, GB = 1e9 bytes)."""

from __future__ import annotations

import pytest
import torch

from slimtrain.registry import compose, llama_dense_specs

VOCAB = 32000
# size: (dim, ffn, layers, heads, rank, multiple_of giving that FFN from torchtitan's 8/3 rule)
FLAVORS = {
    "60M": (512, 1376, 8, 8, 128, 32),
    "130M": (768, 2048, 12, 12, 256, 256),
    "350M": (1024, 2736, 24, 16, 256, 16),
    "1B": (2048, 5461, 24, 32, 512, 1),
}
# methods.md memory table (GB): full-rank, low-rank, SLTrain (+ int64 index), LoRA
PUBLISHED = {
    "60M": (0.35, 0.26, 0.26, 0.01, 0.31),
    "130M": (0.80, 0.56, 0.58, 0.02, 0.73),
    "350M": (2.21, 1.11, 1.17, 0.07, 1.72),
    "1B": (8.03, 3.66, 3.87, 0.29, 6.07),
}
DELTA = 0.03


def recipe(method: str, rank: int):
    if method == "full":
        return compose([])
    sections = {method: {"rank": rank}}
    if method == "sltrain":
        sections[method]["delta"] = DELTA
    return compose([method], sections)


def analytic(method: str, size: str) -> tuple[int, int, int]:
    """(all weights, trainable, int64 index entries), written out from the paper's formulas."""
    d, f, layers, _heads, r, _ = FLAVORS[size]
    mats = [(d, d)] * 4 + [(f, d), (d, f), (f, d)]
    dense_other = 2 * VOCAB * d + (2 * layers + 1) * d
    total = trainable = index = 0
    for m, n in mats:
        nnz = round(DELTA * m * n)
        frozen, train, idx = {
            "full": (0, m * n, 0),
            "low_rank": (0, r * (m + n), 0),
            "lora": (m * n, r * (m + n), 0),
            "sltrain": (0, r * (m + n) + nnz, nnz),
        }[method]
        total += frozen + train
        trainable += train
        index += idx
    return dense_other + layers * total, dense_other + layers * trainable, layers * index


def meta_model(size: str):
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    d, f, layers, heads, _r, multiple_of = FLAVORS[size]
    args = TransformerModelArgs(dim=d, n_layers=layers, n_heads=heads, vocab_size=VOCAB, multiple_of=multiple_of, max_seq_len=256)
    with torch.device("meta"):
        model = Transformer(args)
    assert model.layers["0"].feed_forward.w1.out_features == f
    return model


METHODS = ("full", "low_rank", "lora", "sltrain")


@pytest.mark.parametrize("size", list(FLAVORS))
def test_meta_model_and_estimate_match_the_formula(size):
    d, f, layers, heads, r, _ = FLAVORS[size]
    dense = llama_dense_specs(d, f, layers, VOCAB, heads)
    for method in METHODS:
        comp = recipe(method, r)
        total, trainable, index = analytic(method, size)
        model = meta_model(size)
        if method != "full":
            comp.apply_parametrizations(model)
        params = list(model.parameters())
        assert sum(p.numel() for p in params) == total, (size, method)
        assert sum(p.numel() for p in params if p.requires_grad) == trainable, (size, method)
        if method == "sltrain":
            buffers = [b for n, b in model.named_buffers() if n.endswith(".index")]
            assert sum(b.numel() for b in buffers) == index and all(b.dtype == torch.int64 for b in buffers)
        est = comp.estimate_memory(dense)
        assert est.weight_params == total, (size, method)
        assert est.trainable_params == trainable, (size, method)
        assert est.optimizer_state_elements == 2 * trainable, (size, method)
        assert est.extra_bytes == 8 * index, (size, method)
        assert est.total_bytes == 2 * total + 4 * trainable


@pytest.mark.parametrize("size", list(FLAVORS))
def test_published_memory_figures(size):
    d, f, layers, heads, r, _ = FLAVORS[size]
    dense = llama_dense_specs(d, f, layers, VOCAB, heads)
    full, low, sl, sl_index, lora = PUBLISHED[size]
    got = {m: recipe(m, r).estimate_memory(dense) for m in METHODS}

    def close(x_bytes: int, published: float) -> bool:
        gb = x_bytes / 1e9
        # the table gives two decimals: within 2% or within its rounding (0.005 GB)
        return abs(gb - published) <= max(0.02 * published, 0.0051)

    assert close(got["full"].total_bytes, full), got["full"].total_bytes / 1e9
    assert close(got["low_rank"].total_bytes, low), got["low_rank"].total_bytes / 1e9
    assert close(got["sltrain"].total_bytes, sl), got["sltrain"].total_bytes / 1e9
    assert close(got["sltrain"].extra_bytes, sl_index), got["sltrain"].extra_bytes / 1e9
    assert close(got["lora"].total_bytes, lora), got["lora"].total_bytes / 1e9
    if size == "1B":  # the headline figures, within 2%
        for key, pub in (("full", 8.03), ("low_rank", 3.66), ("sltrain", 3.87), ("lora", 6.07)):
            assert abs(got[key].total_bytes / 1e9 - pub) <= 0.02 * pub, key
        assert abs(got["sltrain"].extra_bytes / 1e9 - 0.29) <= 0.02 * 0.29
