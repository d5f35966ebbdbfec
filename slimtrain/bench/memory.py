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

from slimtrain.registry import ModelDescription, compose, get_methods, llama_dense_specs
from slimtrain.registry.config import config_defaults

from slimtrain.bench.recipes import available_recipes, load_recipe
from slimtrain.cli_args import int_at_least, name_list
from slimtrain.titan_integration.flavors import PAPER_SHAPES, PAPER_VOCAB, paper_settings

DEFAULT_RECIPES = "full_rank,galore,fira,low_rank,lora,relora,sltrain,sltrain_restarts"


def is_toml_path(recipe: str) -> bool:
    return recipe.endswith(".toml")


def recipe_composition(recipe_name: str, flavor: str, rank: int | None = None):
    """The recipe's composition at ``flavor`` and the paper's size-dependent settings there.

    A recipe named by its name takes the paper's settings for the flavor; a TOML path keeps its own
    values. ``rank`` overrides the rank of both. Returns (recipe, composition, paper settings, from_toml).
    """
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
    shape = PAPER_SHAPES[flavor]  # the methods read the model's sizes (e.g. Adam-mini's head size)
    comp.describe_model(ModelDescription(hidden_size=shape.dim, num_heads=shape.n_heads, num_layers=shape.n_layers,
                                         vocab_size=PAPER_VOCAB, source="flavor"))
    return recipe, comp, paper, from_toml


def memory_row(recipe_name: str, flavor: str, rank: int | None = None) -> dict:
    shape = PAPER_SHAPES[flavor]
    dim, ffn, layers, heads = shape.dim, shape.ffn, shape.n_layers, shape.n_heads
    recipe, comp, paper, from_toml = recipe_composition(recipe_name, flavor, rank)
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


def device_row(
    recipe_name: str, flavor: str, *, batch: int, seq_len: int, ac: str, rank: int | None = None, accumulation: int = 1,
) -> dict:
    """What a GPU holds for one recipe (slimtrain.registry.device_memory), in GB (1e9 B); ``batch``
    sequences per micro-batch, ``accumulation`` micro-batches per step."""
    from slimtrain.registry.device_memory import device_memory

    shape = PAPER_SHAPES[flavor]
    recipe, comp, _, from_toml = recipe_composition(recipe_name, flavor, rank)
    mem = device_memory(
        comp, llama_dense_specs(shape.dim, shape.ffn, shape.n_layers, PAPER_VOCAB, shape.n_heads),
        dim=shape.dim, ffn=shape.ffn, layers=shape.n_layers, heads=shape.n_heads, vocab=PAPER_VOCAB,
        batch=batch, seq_len=seq_len, ac=ac, grad_accumulation_steps=accumulation,
    )
    gb = lambda b: b / 1e9  # noqa: E731
    return {
        "recipe": recipe.name, "methods": comp.method_names, "flavor": flavor,
        "settings_from": "toml" if from_toml else "paper", "batch": batch, "seq_len": seq_len,
        "grad_accumulation_steps": accumulation,
        "ac": ac, "weights_gb": gb(mem.weights), "gradients_gb": gb(mem.gradients), "optimizer_gb": gb(mem.optimizer),
        "index_gb": gb(mem.index), "static_gb": gb(mem.static), "activations_gb": gb(mem.activations),
        "total_gb": gb(mem.total), "peak_gb": gb(mem.peak), "peak_at": mem.peak_phase,
    }


def format_device_table(rows: list[dict]) -> str:
    out = [
        "| recipe | methods | weights | gradients | optimizer | index | w+g+o+i | activations | sum | peak | peak at |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['recipe']} | {' + '.join(r['methods'])} | {r['weights_gb']:.2f} | {r['gradients_gb']:.2f} "
            f"| {r['optimizer_gb']:.2f} | {r['index_gb']:.2f} | {r['static_gb']:.2f} | {r['activations_gb']:.2f} "
            f"| {r['total_gb']:.2f} | {r['peak_gb']:.2f} | {r['peak_at']} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtrain memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="1b", choices=sorted(PAPER_SHAPES))
    parser.add_argument(
        "--recipes", default=name_list(DEFAULT_RECIPES), type=name_list,
        help=f"comma-separated recipe names (evaluated at the paper's settings for the flavor) or TOML "
             f"paths (evaluated with the TOML's values); names: {', '.join(available_recipes())}",
    )
    parser.add_argument("--rank", type=int_at_least(1), default=None, help="override the rank of every recipe")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", action="store_true",
                        help="what a GPU holds: + gradients, index buffers and activations (--batch, --seq-len, --ac)")
    parser.add_argument("--batch", type=int_at_least(1), default=16, help="sequences per step (with --device)")
    parser.add_argument("--seq-len", type=int_at_least(1), default=256, help="tokens per sequence (with --device)")
    parser.add_argument("--grad-accumulation-steps", type=int_at_least(1), default=1,
                        help="micro-batches of --batch sequences per step (with --device): gradients accumulate")
    parser.add_argument("--ac", default="full", choices=("none", "selective", "full"),
                        help="activation checkpointing (with --device)")
    parser.add_argument("--dp-shard", type=int_at_least(1), default=1, help="FSDP degree (with --device: per rank)")
    parser.add_argument("--dp-replicate", type=int_at_least(1), default=1, help="HSDP replicate degree (with --device: per rank)")
    parser.add_argument("--tp", type=int_at_least(1), default=1, help="tensor-parallel degree (with --device: per rank)")
    args = parser.parse_args(argv)
    if args.device and (args.dp_shard, args.dp_replicate, args.tp) != (1, 1, 1):
        return _rank_main(args)
    if args.device:
        try:
            rows = [device_row(r.strip(), args.flavor, batch=args.batch, seq_len=args.seq_len, ac=args.ac, rank=args.rank,
                               accumulation=args.grad_accumulation_steps)
                    for r in args.recipes]
        except ValueError as exc:
            print(f"slimtrain memory: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"GPU memory, LLaMA-{args.flavor}, batch {args.batch} x {args.seq_len} tokens "
                  f"x {args.grad_accumulation_steps} micro-batch(es) per step, activation "
                  f"checkpointing {args.ac} (bf16; GB = 1e9 B; registry/device_memory.py)")
            print(format_device_table(rows))
            print("activations: what backward keeps at the end of the forward; sum: w+g+o+i + activations; peak: the "
                  "largest modelled moment of a step (loss, a block's backward, a step with its workspace), its phase "
                  "under 'peak at'")
        return 0
    try:
        rows = [memory_row(r, args.flavor, args.rank) for r in args.recipes]
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


def _rank_main(args) -> int:
    """--device with parallel degrees: one rank's memory (slimtrain/bench/rank_memory.py)."""
    from slimtrain.bench.rank_memory import format_rank_table, rank_row
    from slimtrain.registry.errors import ConfigError

    try:
        rows = [rank_row(r.strip(), args.flavor, batch=args.batch, seq_len=args.seq_len, ac=args.ac,
                         dp_shard=args.dp_shard, dp_replicate=args.dp_replicate, tp=args.tp, rank=args.rank)
                for r in args.recipes]
    except (ValueError, ConfigError) as exc:
        print(f"slimtrain memory: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"Memory of ONE rank, LLaMA-{args.flavor}, global batch {args.batch} x {args.seq_len} tokens "
              f"({rows[0]['local_batch'] if rows else '?'} per rank), dp_shard {args.dp_shard} x dp_replicate "
              f"{args.dp_replicate} x tp {args.tp}, activation checkpointing {args.ac} (bf16; GB = 1e9 B; "
              f"registry/parallel_memory.py)")
        print(format_rank_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
