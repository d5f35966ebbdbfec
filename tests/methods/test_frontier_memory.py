"""``slimtrain memory --flavor 1b`` for APOLLO, APOLLO-Mini, Muon and SCALE against the SCALE paper's
table (weights + optimizer state in bf16, GB = 1e9 bytes) and against the formula of each rule's
declared state."""

from __future__ import annotations

import pytest

from slimtrain.bench.memory import memory_row

# the SCALE paper's LLaMA-1B column (OptimAI-Lab/Minimalist_LLM_Pretraining README)
PUBLISHED_1B = {"full_rank": 8.04, "galore": 4.76, "fira": 4.76, "apollo": 4.76, "apollo_mini": 3.20, "scale": 2.81, "muon": 5.36}
# 1B shapes: dim 2048, FFN 5461, 24 layers, vocab 32000
D, F, L, V = 2048, 5461, 24, 32000
HIDDEN = [(D, D)] * 4 + [(F, D), (D, F), (F, D)]
WEIGHTS = 2 * V * D + (2 * L + 1) * D + L * sum(m * n for m, n in HIDDEN)
OTHER = 2 * V * D + (2 * L + 1) * D  # embedding, head, norms: the default AdamW rule


def state_elements(method: str) -> int:
    """Optimizer-state elements from each rule's declarations, written out."""
    if method == "apollo":  # rank 512: two moments r x max(m, n), the projection r x min(m, n)
        r = 512
        return 2 * OTHER + L * sum(2 * r * max(m, n) + r * min(m, n) for m, n in HIDDEN)
    if method == "apollo_mini":
        return 2 * OTHER + L * sum(2 * max(m, n) + min(m, n) for m, n in HIDDEN)
    if method == "muon":  # one momentum per hidden element; AdamW on the rest
        return 2 * OTHER + L * sum(m * n for m, n in HIDDEN)
    if method == "scale":  # the output head's momentum only; AdamW on the norms
        return V * D + 2 * (2 * L + 1) * D
    raise KeyError(method)


@pytest.mark.parametrize("method", ["apollo", "apollo_mini", "muon", "scale"])
def test_memory_is_weights_plus_declared_state(method):
    row = memory_row(method, "1b")
    assert row["params"] == WEIGHTS
    assert row["total_gb"] * 1e9 == pytest.approx(2 * WEIGHTS + 2 * state_elements(method), abs=1)


@pytest.mark.parametrize("method", ["apollo", "apollo_mini", "scale"])
def test_1b_figures_within_2_percent_of_the_published_table(method):
    got = memory_row(method, "1b")["total_gb"]
    assert abs(got - PUBLISHED_1B[method]) <= 0.02 * PUBLISHED_1B[method], got


def test_muon_counts_adamw_on_embedding_and_head_unlike_the_table():
    """The table's 5.36 GB is 2 x the weights: one state element per parameter, i.e. momentum on the
    embedding and head too. Muon here (as its authors and torch.optim.Muon prescribe) leaves them to
    AdamW (two moments): 5.62 GB, 4.9% above the table (docs/methods/frontier-optimizers.md)."""
    got = memory_row("muon", "1b")["total_gb"]
    assert got == pytest.approx(2 * WEIGHTS / 1e9 + 2 * state_elements("muon") / 1e9)
    assert PUBLISHED_1B["muon"] == pytest.approx(4 * WEIGHTS / 1e9, abs=0.01)
    assert got - PUBLISHED_1B["muon"] == pytest.approx(2 * OTHER / 1e9, abs=0.01)


def test_apollo_mini_stays_rank_1_at_every_size():
    for flavor in ("60m", "130m", "350m", "1b"):
        assert memory_row("apollo_mini", flavor)["total_gb"] < memory_row("apollo", flavor)["total_gb"]
