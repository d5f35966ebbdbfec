"""Deterministic train/validation split by document identity.

The split must not depend on which other documents exist, on processing order, on
the machine or on Python's per-process hash seed - otherwise adding a source or
re-running on another machine would move text between train and validation and
make perplexities incomparable.  So each document's split is a pure function of
``sha256(salt + doc_id)``.  The same hash also gives the (deterministic) order in
which documents are written, which interleaves sources in the token files.
"""

from __future__ import annotations

import hashlib

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SALT = "slimtrain-corpus-v1"

TRAIN = "train"
VAL = "val"


def doc_hash(doc_id: str, salt: str = DEFAULT_SALT) -> int:
    """A 64-bit integer uniformly distributed over documents, stable everywhere."""
    digest = hashlib.sha256(f"{salt}\x00{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def split_of(doc_id: str, val_fraction: float = DEFAULT_VAL_FRACTION,
             salt: str = DEFAULT_SALT) -> str:
    """``"val"`` for about ``val_fraction`` of documents, ``"train"`` otherwise."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return VAL if doc_hash(doc_id, salt) < val_fraction * 2**64 else TRAIN


def order_key(doc_id: str, salt: str = DEFAULT_SALT) -> tuple[int, str]:
    """Sort key for writing documents: a pseudo-random but fixed order."""
    return doc_hash(doc_id, salt + "/order"), doc_id
