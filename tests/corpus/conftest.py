"""Fixtures: a tiny corpus prepared once per session from generated text."""

from __future__ import annotations

import pytest

from slimtrain.corpus.prepare import CorpusSettings, prepare_corpus

from .fakes import fake_sources

SMALL_VOCAB = 320
SETTINGS = CorpusSettings(vocab_size=SMALL_VOCAB, val_fraction=0.3)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """(data_dir, PrepareResult) of a corpus built from the fake sources."""
    data_dir = tmp_path_factory.mktemp("corpus")
    result = prepare_corpus(data_dir, SMALL_VOCAB, sources=fake_sources(), settings=SETTINGS)
    return data_dir, result
