"""Target patterns: suffix matching, candidate listing, overlap probing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimtrain.registry import ConfigError
from slimtrain.registry.targets import DEFAULT_TARGETS, matches, probe_overlap, select_linears
from tests.registry.fakes import TinyModel


@pytest.mark.parametrize(
    "fqn, pattern, expected",
    [
        ("layers.3.attention.wq", "wq", True),
        ("layers.3.attention.wq", "attention.*", True),
        ("layers.3.attention.wq", "layers.3.*", True),
        ("layers.3.attention.wq", "w", False),
        ("layers.3.attention.wq", "feed_forward.*", False),
        ("output", "wq", False),
        ("tok_embeddings", "*norm*", False),
    ],
)
def test_matches(fqn, pattern, expected):
    assert matches(fqn, pattern) is expected


@given(st.sampled_from(DEFAULT_TARGETS), st.integers(0, 99))
def test_default_target_matches_its_module_only(name, layer):
    block = "attention" if name.startswith("w") and name in ("wq", "wk", "wv", "wo") else "feed_forward"
    fqn = f"layers.{layer}.{block}.{name}"
    assert matches(fqn, name)
    assert [t for t in DEFAULT_TARGETS if matches(fqn, t)] == [name]


def test_select_linears_default_skips_output_and_embeddings():
    chosen = [fqn for fqn, _ in select_linears(TinyModel(), DEFAULT_TARGETS, owner="x")]
    assert len(chosen) == 14 and not any("output" in c for c in chosen)


def test_select_linears_error_lists_candidates():
    with pytest.raises(ConfigError, match=r"\[lora\] targets = \['q_proj'\] match no Linear.*output.*w1.*wq"):
        select_linears(TinyModel(), ["q_proj"], owner="lora")


def test_probe_overlap():
    assert probe_overlap(["wq"], ["wk"]) == []
    assert probe_overlap(["attention.*"], ["wk"]) == ["layers.0.attention.wk"]
    assert probe_overlap(["mlp.*"], ["mlp.fc1"]) == ["mlp.fc1"]
