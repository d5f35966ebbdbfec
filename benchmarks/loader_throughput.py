"""Tokens per second of the slimtrain corpus loader alone (no model, no GPU).

Measures ``TokenFileDataset`` bare and through torchtitan's ``ParallelAwareDataloader``
(the object the trainer iterates), on the prepared train split, single process,
``num_workers=0``.  Issue 5 requires more than 200k tokens/s per process (the
full-rank 60M flavor trains at about 170k tokens/s on one H100).

    python benchmarks/loader_throughput.py [--data-dir DIR] [--vocab-size N]
        [--seq-len 2048] [--batch-size 8] [--seconds 5]

Prepares the corpus first if it is missing (``ensure_corpus``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimtrain.corpus import ensure_corpus  # noqa: E402
from slimtrain.titan_integration.corpus_dataset import TokenFileDataset, corpus_loader  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(iterable_factory, seconds: float, count_tokens) -> tuple[float, int]:
    """Iterate (restarting when exhausted) for ``seconds``; return (tokens/s, tokens)."""
    tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for item in iterable_factory():
            tokens += count_tokens(item)
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    return tokens / elapsed, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)

    folder = ensure_corpus(args.data_dir, vocab_size=args.vocab_size)
    path = folder / "train.bin"

    def dataset():
        return TokenFileDataset(path, args.seq_len, infinite=False, shuffle=True)

    bare, _ = measure(dataset, args.seconds, lambda s: s[0]["input"].numel())
    loader, _ = measure(
        lambda: corpus_loader(dataset(), batch_size=args.batch_size),
        args.seconds, lambda b: b[0]["input"].numel())
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} "
                   f"{platform.machine()}",
        "corpus": str(folder),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "dataset_tokens_per_s": round(bare),
        "dataloader_tokens_per_s": round(loader),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}")
    return 0 if min(bare, loader) > 200_000 else 1


if __name__ == "__main__":
    raise SystemExit(main())
