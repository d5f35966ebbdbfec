"""argparse value types that refuse bad values with the value and the allowed range.

Why: ``slimtrain memory --batch -5`` printed a table with negative activation memory, ``--batch 0``
and ``--seq-len 0`` printed zeros and ``--recipes ""`` an empty table, all with exit status 0.
With these types argparse answers ``argument --batch: -5: allowed: an integer >= 1`` (exit 2,
no traceback) before any work starts.
"""

from __future__ import annotations

import argparse
import math


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed: an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: allowed: an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a finite number > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: allowed: a finite number > 0")
    return value


def name_list(text: str) -> list[str]:
    """A comma-separated, non-empty list of names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: one or more comma-separated names")
    return names


def positive_float_list(text: str) -> list[float]:
    """Comma-separated finite numbers > 0 (an empty string: none)."""
    return [positive_float(x.strip()) for x in text.split(",") if x.strip()]
