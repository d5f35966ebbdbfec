"""``slimtrain bench``: run recipes side by side at the same token budget; write tables and plots.

Every recipe runs through the user's own command (``torchrun titan_integration/train.py``) with the
same flavor, steps, batch and sequence length, once per learning rate of ``--lr`` (the paper's
point: compare methods each at its best LR). A failed run is reported with its error and the sweep
goes on.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
from pathlib import Path

from slimtrain.bench import report, runner
from slimtrain.bench.recipes import available_recipes, load_recipe
from slimtrain.cli_args import int_at_least, name_list, positive_float, positive_float_list

DEFAULT_RECIPES = "full_rank,galore,fira,low_rank,lora,relora,sltrain,sltrain_restarts"


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def method_overrides(recipe_name: str, flavor: str, rank: int | None) -> dict[str, dict]:
    """Per-method settings for a run at ``flavor``: the flavor's rank (or ``rank``) for every
    method that has one, and the papers' size-dependent settings (SLTrain alpha, Fira scale)."""
    from slimtrain.registry import get_methods
    from slimtrain.registry.config import config_defaults
    from slimtrain.titan_integration.flavors import paper_settings

    installed = get_methods()
    methods = load_recipe(recipe_name).methods
    out = paper_settings(flavor, methods, lambda m: "rank" in config_defaults(installed[m].cls.Config))
    if rank is not None:
        for values in out.values():
            if "rank" in values:
                values["rank"] = rank
    return out


def _analytic(recipe_name: str, flavor: str, seq_len: int, overrides: dict[str, dict]) -> tuple[float, float]:
    """(weights + optimizer GiB at 4 bytes/element as trained on CPU/fp32 params, FLOPs per token)."""
    from slimtrain.registry import compose, llama_dense_specs
    from slimtrain.registry.memory import training_flops_per_token
    from slimtrain.titan_integration.flavors import FLAVORS, ffn_hidden_dim

    args = FLAVORS[flavor]
    recipe = load_recipe(recipe_name)
    sections = {k: dict(v) for k, v in recipe.sections.items()}
    for method, values in overrides.items():
        sections.setdefault(method, {}).update(values)
    comp = compose(recipe.methods, sections)
    dense = llama_dense_specs(args.dim, ffn_hidden_dim(args), args.n_layers, args.vocab_size, args.n_heads, args.n_kv_heads)
    est = comp.estimate_memory(dense, bytes_per_element=4)
    flops = training_flops_per_token(comp, dense, n_layers=args.n_layers, dim=args.dim, seq_len=seq_len)
    return est.total_bytes / 2**30, flops


def _row(result: runner.RunResult, est_gib: float, flops_per_token: float) -> dict:
    spec = result.spec
    mem = result.memory
    measured = math.nan
    if mem:
        measured = (mem.get("trainable_param_bytes", 0) + mem.get("frozen_param_bytes", 0) + mem.get("optimizer_state_bytes", 0)) / 2**30
    steps_done = result.losses[-1][0] if result.losses else 0
    tokens = steps_done * spec.tokens_per_step
    return {
        "run": spec.name,
        "recipe": spec.recipe,
        "lr": spec.lr if spec.lr is not None else load_recipe(spec.recipe).raw.get("optimizer", {}).get("lr", math.nan),
        "status": "ok" if result.ok else ("timeout" if result.ended.startswith("timed out")
                                           else "interrupted" if result.ended.startswith("interrupted") else "failed"),
        "ended": result.ended,
        "val_perplexity": result.val_perplexity,
        "val_loss": result.val_loss,
        "final_train_loss": result.final_loss,
        "tokens_per_s": result.tokens_per_s,
        "peak_memory_gib": mem.get("peak_bytes", -1) / 2**30 if mem.get("peak_bytes", -1) >= 0 else math.nan,
        "weights_optimizer_measured_gib": measured,
        "weights_optimizer_estimated_gib": est_gib,
        "train_flops": flops_per_token * tokens,
        "tokens": tokens,
        "wall_s": round(result.wall_s, 1),
        "val_curve": [[s * spec.tokens_per_step, loss] for s, loss, _ in result.val],
        "command": " ".join(spec.command()),
        "error": result.error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtrain bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=name_list(DEFAULT_RECIPES), type=name_list, help=f"comma-separated; available: {', '.join(available_recipes())}")
    parser.add_argument("--flavor", default="60m")
    parser.add_argument("--steps", type=int_at_least(1), default=200)
    parser.add_argument("--nproc", type=int_at_least(1), default=1)
    parser.add_argument("--batch", type=int_at_least(1), default=8, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int_at_least(1), default=256)
    parser.add_argument("--rank", type=int_at_least(1), default=None, help="rank of every method that has one (default: the flavor's rank)")
    parser.add_argument("--lr", default=[], type=positive_float_list, help="comma-separated LRs to sweep per recipe (default: each recipe's own)")
    parser.add_argument("--val-every", type=int_at_least(0), default=0, help="validation interval in steps (default: steps/4)")
    parser.add_argument("--val-steps", type=int_at_least(1), default=8)
    parser.add_argument("--timeout", type=positive_float, default=None, help="seconds per run")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for every run")
    args = parser.parse_args(argv)
    from slimtrain.titan_integration.flavors import FLAVORS

    if args.flavor not in FLAVORS:
        parser.error(f"argument --flavor: {args.flavor!r}: allowed: {', '.join(FLAVORS)}")

    recipes = args.recipes
    unknown = [r for r in recipes if r not in available_recipes()]
    if unknown:
        print(f"slimtrain bench: unknown recipe(s) {', '.join(unknown)}; available: {', '.join(available_recipes())}", file=sys.stderr)
        return 2
    lrs: list[float | None] = list(args.lr) or [None]
    out = Path(args.out)
    extra = tuple(a for a in args.extra if a != "--")
    val_every = args.val_every or max(1, args.steps // 4)
    specs = [
        runner.RunSpec(
            r, lr, args.flavor, args.steps, args.nproc, args.batch, args.seq_len, out, val_every, args.val_steps,
            extra, method_overrides(r, args.flavor, args.rank),
        )
        for r in recipes
        for lr in lrs
    ]
    rows, curves = [], {}
    interrupted = False
    for i, spec in enumerate(specs, 1):
        print(f"[bench {i}/{len(specs)}] {spec.name}: {args.steps} steps of {spec.tokens_per_step} tokens ...", flush=True)
        try:
            result = runner.run(spec, timeout_s=args.timeout)
        except runner.BenchInterrupted as stop:
            print(f"[bench {i}/{len(specs)}] {spec.name}: {stop.result.ended}; writing the tables of the "
                  f"{len(rows)} run(s) that ended before", file=sys.stderr, flush=True)
            interrupted = True
            break
        try:
            est_gib, flops = _analytic(spec.recipe, args.flavor, args.seq_len, spec.overrides)
        except Exception as exc:  # an estimate must not sink the sweep
            est_gib, flops = math.nan, math.nan
            result.error = result.error or f"estimate failed: {exc}"
        row = _row(result, est_gib, flops)
        rows.append(row)
        curves[spec.name] = row["val_curve"]
        state = (f"ok: val ppl {row['val_perplexity']:.2f}, loss {row['final_train_loss']:.3f}" if result.ok
                 else f"{row['status'].upper()}: {result.error}")
        print(f"[bench {i}/{len(specs)}] {spec.name} {state} ({result.wall_s:.0f} s; log {spec.folder / 'train.log'})", flush=True)

    if not rows:
        print("slimtrain bench: interrupted before any run ended; no table written", file=sys.stderr)
        return 130
    header = (
        f"# slimtrain bench: {', '.join(recipes)} at flavor {args.flavor}\n\n"
        f"{datetime.date.today().isoformat()}, {_device()}, {args.nproc} process(es), {args.steps} steps x "
        f"{args.batch * args.seq_len * args.nproc} tokens, embedded default corpus. Command: "
        f"`slimtrain bench {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    paths = report.write_tables(rows, out, header)
    plots = report.write_plots(rows, curves, out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), *plots]))
    if interrupted:
        return 130
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
