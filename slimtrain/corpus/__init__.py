"""The embedded default corpus and tokenizer (issue 5).

Real English text from packages the registries carry, cleaned, split, tokenized with
a locally trained byte-level BPE and pre-tokenized for a fast torchtitan loader.

No torchtitan here: its loaders over this corpus are slimtrain.titan_integration.corpus_dataset.
"""

from .prepare import (
    DEFAULT_VOCAB_SIZE,
    CorpusError,
    CorpusSettings,
    PrepareResult,
    default_data_dir,
    ensure_corpus,
    prepare_corpus,
)

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "CorpusError",
    "CorpusSettings",
    "PrepareResult",
    "default_data_dir",
    "ensure_corpus",
    "prepare_corpus",
]
