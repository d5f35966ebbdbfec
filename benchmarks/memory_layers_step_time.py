"""Step time of 8-bit optimizer state and per-layer updates vs the same recipe without them (CPU).

The variants of ``benchmarks/step_time.py`` (interleaved steps, median) for the memory layers:
AdamW and GaLore (rank 128, refresh every 200 steps, so the timed steps do no refresh), each alone,
with ``state_8bit``, with ``per_layer_updates``, and GaLore with both.
``python benchmarks/memory_layers_step_time.py --flavor tiny``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_time import build, common_args, header, time_round_robin, tokens_for  # noqa: E402

GALORE = {"galore": {"rank": 128, "update_proj_gap": 200}}
VARIANTS = [
    ("adamw", ["adamw"], {}),
    ("adamw + state_8bit", ["adamw", "state_8bit"], {}),
    ("adamw + per_layer_updates", ["adamw", "per_layer_updates"], {}),
    ("galore", ["galore"], GALORE),
    ("galore + state_8bit", ["galore", "state_8bit"], GALORE),
    ("galore + per_layer_updates", ["galore", "per_layer_updates"], GALORE),
    ("galore + state_8bit + per_layer_updates", ["galore", "state_8bit", "per_layer_updates"], GALORE),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(header(args))
    built = {name: build(args.flavor, methods, sections) for name, methods, sections in VARIANTS}
    medians = time_round_robin(built, tokens_for(args), args.steps)
    print("| recipe | step s | vs without |")
    print("|---|---|---|")
    base = {}
    for name, t in medians.items():
        root = name.split(" + ")[0]
        base.setdefault(root, t)
        print(f"| {name} | {t:.3f} | {t / base[root]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
