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


def memory_row(recipe_name: str, flavor: str, rank: int | None = None) -> dict:
    shape = PAPER_SHAPES[flavor]
    dim, ffn, layers, heads, paper_rank = shape.dim, shape.ffn, shape.n_layers, shape.n_heads, shape.rank
    recipe = load_recipe(recipe_name)
    installed = get_methods()
    sections = {k: dict(v) for k, v in recipe.sections.items()}
    has_rank = lambda m: "rank" in config_defaults(installed[m].cls.Config)  # noqa: E731
    for method, values in paper_settings(flavor, recipe.methods, has_rank).items():
        sections.setdefault(method, {}).update(values)
        if rank is not None and "rank" in values:
            sections[method]["rank"] = rank
    comp = compose(recipe.methods, sections)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtrain memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="1b", choices=sorted(PAPER_SHAPES))
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated; available: {', '.join(available_recipes())}")
    parser.add_argument("--rank", type=int, default=None, help="override the paper's rank for this flavor")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
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
