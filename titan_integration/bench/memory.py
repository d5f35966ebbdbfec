"""``slimtrain memory``: the analytic memory table (weights + optimizer state + extra buffers).

The model is the benchmark paper's (2 bytes per weight and per optimizer-state element, GB = 1e9
bytes); every method answers for its own parameters and state through the registry's memory hooks,
so a third-party method appears in the table with no change here.

Which settings a row uses, and the table says so under it: a built-in recipe named by its name
(``sltrain``) is evaluated at the paper's settings for the chosen flavor (its rank, SLTrain's alpha,
Fira's scale), since the recipes carry the 60M ones; a recipe given as a TOML path
(``--recipes my/run.toml``) is evaluated with that TOML's own values, and the table notes where
they differ from the paper's at that flavor. ``--rank`` overrides the rank of both.
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


def is_toml_path(recipe: str) -> bool:
    return recipe.endswith(".toml")


def memory_row(recipe_name: str, flavor: str, rank: int | None = None) -> dict:
    shape = PAPER_SHAPES[flavor]
    dim, ffn, layers, heads = shape.dim, shape.ffn, shape.n_layers, shape.n_heads
    recipe = load_recipe(recipe_name)
    installed = get_methods()
    sections = {k: dict(v) for k, v in recipe.sections.items()}
    has_rank = lambda m: "rank" in config_defaults(installed[m].cls.Config)  # noqa: E731
    paper = paper_settings(flavor, recipe.methods, has_rank)
    from_toml = is_toml_path(recipe_name)
    if not from_toml:
        for method, values in paper.items():
            sections.setdefault(method, {}).update(values)
    if rank is not None:
        for method in paper:
            if "rank" in paper[method]:
                sections.setdefault(method, {})["rank"] = rank
    comp = compose(recipe.methods, sections)
    est = comp.estimate_memory(llama_dense_specs(dim, ffn, layers, PAPER_VOCAB, heads))
    used = {f"{m}.{k}": getattr(comp.method(m).config, k) for m, values in paper.items() for k in values}
    differs = {key: (value, paper[key.split(".")[0]][key.split(".")[1]]) for key, value in used.items()
               if value != paper[key.split(".")[0]][key.split(".")[1]]}
    return {
        "recipe": recipe.name,
        "methods": comp.method_names,
        "flavor": flavor,
        "settings_from": "toml" if from_toml else "paper",
        "settings": used,
        "differs_from_paper": {k: {"used": u, "paper": p} for k, (u, p) in differs.items()},
        "params": est.weight_params,
        "trainable_params": est.trainable_params,
        "weights_gb": est.weights_bytes / 1e9,
        "optimizer_gb": est.optimizer_bytes / 1e9,
        "total_gb": est.total_bytes / 1e9,
        "extra_gb": est.extra_bytes / 1e9,
    }


def settings_notes(rows: list[dict]) -> str:
    """Under the table: which values each row used and where they came from."""
    out = []
    for r in rows:
        values = ", ".join(f"{k} = {v}" for k, v in r["settings"].items()) or "no size-dependent settings"
        source = "its TOML's values" if r["settings_from"] == "toml" else "the paper's values at this size"
        line = f"- {r['recipe']}: {source}: {values}"
        if r["differs_from_paper"]:
            line += "; differs from the paper's: " + ", ".join(
                f"{k} {d['used']} (paper: {d['paper']})" for k, d in r["differs_from_paper"].items()
            )
        out.append(line)
    return "\n".join(out)


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
    parser.add_argument(
        "--recipes", default=DEFAULT_RECIPES,
        help=f"comma-separated recipe names (evaluated at the paper's settings for the flavor) or TOML "
             f"paths (evaluated with the TOML's values); names: {', '.join(available_recipes())}",
    )
    parser.add_argument("--rank", type=int, default=None, help="override the rank of every recipe")
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
        print("\nSettings used:")
        print(settings_notes(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
