"""Training-step time of recipes side by side on one machine, fairly on a shared one (CPU).

One step = forward + backward + optimizer step (with the composition's step hooks) of the flavor's
torchtitan LLaMA in fp32 on ``--batch x --seq-len`` random tokens. The variants' steps are
interleaved (one step of each per round, 2 warm-up rounds, median over ``--steps`` rounds), so a
change of load on a shared machine hits every variant alike: ``slimtrain bench`` runs recipes one
after another, and its tokens/s on a loaded machine compares loads as much as methods.

    python benchmarks/step_time.py --flavor tiny --recipes full_rank,galore,fira,apollo,apollo_mini,muon,scale \
        --set muon.ns_dtype=float32

Recipes are names or TOML paths (their methods and method sections; ``--set method.key=value``
overrides a key in every recipe that has the method). Refreshes and restarts follow the recipe's
periods (200+ steps in the recipes), so the timed steps are the steady state between them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from slimtrain.titan_integration.flavors import FLAVORS, build_model


def build(flavor: str, methods: list[str], sections: dict):
    """The flavor's model with the composition's parametrizations and its composed optimizer, with
    the memory layers installed as the trainer installs them."""
    from slimtrain.plugins.per_layer_updates import PerLayerStepper
    from slimtrain.plugins.state_8bit import install_codec
    from slimtrain.registry import OptimizerHyper, compose

    comp = compose(methods, sections)
    torch.manual_seed(0)
    model = build_model(flavor)
    if comp.apply_parametrizations(model):
        comp.init_parametrized(model)
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-3))
    if "state_8bit" in methods:
        install_codec(opt, comp.method("state_8bit").codec())
    if "per_layer_updates" in methods:
        PerLayerStepper(opt)
    return comp, model, opt


def one_step(comp, model, opt, tokens) -> float:
    from slimtrain.registry import StepContext

    t0 = time.perf_counter()
    out = model(tokens)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    opt.step()
    opt.zero_grad()
    comp.after_step(StepContext(opt.global_step, [model], [opt]))
    return time.perf_counter() - t0


def time_round_robin(built: dict, tokens, steps: int) -> dict[str, float]:
    """Median step time per variant, one step of each variant per round after 2 warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name in built}
    for i in range(steps + 2):
        for name, parts in built.items():
            t = one_step(*parts, tokens)
            if i >= 2:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def header(args) -> str:
    return (f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, CPU {platform.machine()} "
            f"({args.threads} thread(s), shared machine: load average before {os.getloadavg()[0]:.1f}), torch "
            f"{torch.__version__}, flavor {args.flavor}, batch {args.batch} x {args.seq_len}, median of {args.steps} "
            f"interleaved steps")


def tokens_for(args) -> torch.Tensor:
    vocab = FLAVORS[args.flavor].vocab_size
    return torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))


def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on shared cores)")


def _toml_value(text: str):
    """``--set`` values as TOML would read them (8 -> int, 0.5 -> float, true -> bool), else the text."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def recipe_variants(names: list[str], overrides: list[str]) -> list[tuple[str, list[str], dict]]:
    from slimtrain.bench.recipes import load_recipe

    out = []
    for name in names:
        recipe = load_recipe(name)
        sections = {k: dict(v) for k, v in recipe.sections.items()}
        for item in overrides:
            key, _, value = item.partition("=")
            method, _, field = key.partition(".")
            if method in recipe.methods:
                sections.setdefault(method, {})[field] = _toml_value(value)
        out.append((recipe.name, list(recipe.methods) or ["adamw"], sections))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap)
    ap.add_argument("--recipes", required=True, help="comma-separated recipe names or TOML paths; the first is the baseline")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = recipe_variants([r.strip() for r in args.recipes.split(",") if r.strip()], args.set)
    print(header(args))
    built = {name: build(args.flavor, methods, sections) for name, methods, sections in variants}
    medians = time_round_robin(built, tokens_for(args), args.steps)
    base = next(iter(medians.values()))
    tokens = args.batch * args.seq_len
    print(f"| recipe | step s | tokens/s | vs {next(iter(medians))} |")
    print("|---|---|---|---|")
    for name, t in medians.items():
        print(f"| {name} | {t:.3f} | {tokens / t:,.0f} | {base / t:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
