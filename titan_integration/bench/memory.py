"""``slimtrain memory``: the analytic memory table (weights + optimizer state + extra buffers).

The model is the benchmark paper's (2 bytes per weight and per optimizer-state element, GB = 1e9
bytes); every method answers for its own parameters and state through the registry's memory hooks,
so a third-party method appears in the table with no change here. Each recipe is evaluated at the
paper's rank for the chosen flavor (``rank`` keys are set to it) unless ``--rank`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys

from registry import compose, get_methods, llama_dense_specs
from registry.config import config_defaults

from titan_integration.bench.recipes import available_recipes, load_recipe
from titan_integration.flavors import PAPER_SHAPES, PAPER_VOCAB, paper_settings

DEFAULT_RECIPES = "full_rank,galore,fira,low_rank,lora,relora,sltrain,sltrain_restarts"


def recipe_composition(recipe, flavor: str, rank: int | None = None, *, recipe_ranks: bool = False):
    """The recipe's composition at ``flavor``: the paper's rank for the flavor (or ``rank``), or the
    recipe's own settings as written with ``recipe_ranks``."""
    installed = get_methods()
    sections = {k: dict(v) for k, v in recipe.sections.items()}
    if not recipe_ranks:
        has_rank = lambda m: "rank" in config_defaults(installed[m].cls.Config)  # noqa: E731
        for method, values in paper_settings(flavor, recipe.methods, has_rank).items():
            sections.setdefault(method, {}).update(values)
            if rank is not None and "rank" in values:
                sections[method]["rank"] = rank
    return compose(recipe.methods, sections)


def memory_row(recipe_name: str, flavor: str, rank: int | None = None) -> dict:
    shape = PAPER_SHAPES[flavor]
    dim, ffn, layers, heads, paper_rank = shape.dim, shape.ffn, shape.n_layers, shape.n_heads, shape.rank
    recipe = load_recipe(recipe_name)
    comp = recipe_composition(recipe, flavor, rank)
    est = comp.estimate_memory(llama_dense_specs(dim, ffn, layers, PAPER_VOCAB, heads))
    return {
        "recipe": recipe.name,
        "methods": comp.method_names,
        "flavor": flavor,
        "rank": rank or paper_rank,
        "params": est.weight_params,
        "trainable_params": est.trainable_params,
        "weights_gb": est.weights_bytes / 1e9,
        "optimizer_gb": est.optimizer_bytes / 1e9,
        "total_gb": est.total_bytes / 1e9,
        "extra_gb": est.extra_bytes / 1e9,
    }


def format_table(rows: list[dict]) -> str:
    out = [
        "| recipe | methods | params (M) | trainable (M) | weights GB | optimizer GB | total GB | extra GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['recipe']} | {' + '.join(r['methods'])} | {r['params'] / 1e6:.1f} | {r['trainable_params'] / 1e6:.1f} "
            f"| {r['weights_gb']:.2f} | {r['optimizer_gb']:.2f} | {r['total_gb']:.2f} | {r['extra_gb']:.2f} |"
        )
    return "\n".join(out)


def device_row(recipe_name: str, flavor: str, *, batch: int, seq_len: int, ac: str, rank: int | None = None,
               recipe_ranks: bool = False) -> dict:
    """What a GPU holds for one recipe (registry.activation_memory), in GB (1e9 B)."""
    from registry.activation_memory import device_memory

    shape = PAPER_SHAPES[flavor]
    recipe = load_recipe(recipe_name)
    comp = recipe_composition(recipe, flavor, rank, recipe_ranks=recipe_ranks)
    mem = device_memory(
        comp, llama_dense_specs(shape.dim, shape.ffn, shape.n_layers, PAPER_VOCAB, shape.n_heads),
        dim=shape.dim, ffn=shape.ffn, layers=shape.n_layers, heads=shape.n_heads, vocab=PAPER_VOCAB,
        batch=batch, seq_len=seq_len, ac=ac,
    )
    gb = lambda b: b / 1e9  # noqa: E731
    return {
        "recipe": recipe.name, "methods": comp.method_names, "flavor": flavor, "batch": batch, "seq_len": seq_len,
        "ac": ac, "weights_gb": gb(mem.weights), "gradients_gb": gb(mem.gradients), "optimizer_gb": gb(mem.optimizer),
        "index_gb": gb(mem.index), "static_gb": gb(mem.static), "activations_gb": gb(mem.activations),
        "total_gb": gb(mem.total),
    }


def format_device_table(rows: list[dict]) -> str:
    out = [
        "| recipe | methods | weights | gradients | optimizer | index | w+g+o+i | activations | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['recipe']} | {' + '.join(r['methods'])} | {r['weights_gb']:.2f} | {r['gradients_gb']:.2f} "
            f"| {r['optimizer_gb']:.2f} | {r['index_gb']:.2f} | {r['static_gb']:.2f} | {r['activations_gb']:.2f} "
            f"| {r['total_gb']:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtrain memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="1b", choices=sorted(PAPER_SHAPES))
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated; available: {', '.join(available_recipes())}")
    parser.add_argument("--rank", type=int, default=None, help="override the paper's rank for this flavor")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", action="store_true",
                        help="what a GPU holds: + gradients, index buffers and activations (--batch, --seq-len, --ac)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ac", default="full", choices=("none", "selective", "full"), help="activation checkpointing")
    parser.add_argument("--recipe-ranks", action="store_true", help="use the recipes' ranks as written, not the paper's")
    args = parser.parse_args(argv)
    if args.device:
        try:
            rows = [device_row(r.strip(), args.flavor, batch=args.batch, seq_len=args.seq_len, ac=args.ac, rank=args.rank,
                               recipe_ranks=args.recipe_ranks) for r in args.recipes.split(",") if r.strip()]
        except ValueError as exc:
            print(f"slimtrain memory: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"GPU memory, LLaMA-{args.flavor}, batch {args.batch} x {args.seq_len} tokens, activation "
                  f"checkpointing {args.ac} (bf16; GB = 1e9 B; registry/activation_memory.py)")
            print(format_device_table(rows))
        return 0
    try:
        rows = [memory_row(r.strip(), args.flavor, args.rank) for r in args.recipes.split(",") if r.strip()]
    except ValueError as exc:
        print(f"slimtrain memory: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"Analytic memory, LLaMA-{args.flavor} (bf16: 2 bytes per weight and optimizer-state element; GB = 1e9 B)")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
