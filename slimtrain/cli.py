"""The ``slimtrain`` command: ``list`` here; heavier subcommands live where their code lives and are
imported only when asked for, so ``slimtrain list`` never imports torchtitan.

It lives in titan_integration, not in registry/, because its subcommands (prepare-data, bench,
memory) are torchtitan code: registry/ imports nothing from here and stays importable with torch
alone."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from slimtrain.registry.config import config_defaults, config_types

# subcommand -> "module:function" taking argv (list[str]) and returning an exit code (imported
# only when the subcommand runs).
DELEGATED = {
    "train": ("slimtrain.launch:main", "torchrun titan_integration/train.py, with one message for a settings error"),
    "prepare-data": ("slimtrain.corpus.cli:main", "build the embedded default corpus and tokenizer"),
    "bench": ("slimtrain.bench.cli:main", "run recipes side by side and write tables and plots"),
    "memory": ("slimtrain.bench.memory:main", "print the analytic memory table of recipes"),
    "gpu-check": ("slimtrain.gpu_check:main", "measure every GPU goal in one prepared run (<= 9 min)"),
    "export": ("slimtrain.titan_integration.export:main", "a run's newest checkpoint as a dense Hugging Face Llama"),
}


def _type_name(t) -> str:
    import typing

    if typing.get_args(t):  # tuple[str, ...], float | None: the full form says more than "tuple"
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def list_methods(as_json: bool = False) -> str:
    from slimtrain.registry.manager import get_methods

    rows = []
    for name, info in get_methods().items():
        cls = info.cls
        defaults = config_defaults(cls.Config)
        types = config_types(cls.Config)
        rows.append(
            {
                "name": name,
                "source": info.source,
                "summary": cls.summary,
                "capabilities": sorted(c.value for c in cls.provides),
                "requires": [r.why for r in cls.requires],
                "config": {k: {"type": _type_name(types[k]), "default": defaults.get(k)} for k in types},
            }
        )
    if as_json:
        return json.dumps(rows, indent=2, default=str)
    lines = []
    for row in rows:
        lines.append(f"{row['name']}  ({row['source']})")
        if row["summary"]:
            lines.append(f"  {row['summary']}")
        lines.append(f"  capabilities: {', '.join(row['capabilities']) or '-'}")
        if row["requires"]:
            lines.append(f"  requires: {'; '.join(row['requires'])}")
        for key, meta in row["config"].items():
            lines.append(f"  [{row['name']}] {key}: {meta['type']} = {meta['default']!r}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        target, _ = DELEGATED[argv[0]]
        module_name, func = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                print(f"slimtrain {argv[0]}: not available in this installation ({exc})", file=sys.stderr)
                return 2
            raise
        return int(getattr(module, func)(argv[1:]) or 0)

    parser = argparse.ArgumentParser(prog="slimtrain", description="Composable memory-efficient pretraining methods")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list installed methods, their capabilities and config keys")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)
    if args.command == "list":
        sys.stdout.write(list_methods(as_json=args.json))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
