"""Module-name patterns: which Linear layers a method acts on.

A pattern is an fnmatch glob matched against a module's fully qualified name or any dotted suffix
of it, so ``wq`` matches ``layers.3.attention.wq`` and ``attention.*`` matches every attention
projection. The defaults name LLaMA's projections (q, k, v, o, gate/down/up) as torchtitan names
them and as Hugging Face transformers names them (``q_proj`` ... ``down_proj``), so a recipe runs
on either model unchanged; embeddings, norms and the output head are never matched by them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence

TITAN_TARGETS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
HF_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: tuple[str, ...] = TITAN_TARGETS + HF_TARGETS

# Representative module names, used to decide without a model whether two methods' patterns overlap.
_PROBE_NAMES: tuple[str, ...] = tuple(
    f"layers.0.{block}.{name}"
    for block, names in (
        ("attention", ("wq", "wk", "wv", "wo")),
        ("feed_forward", ("w1", "w2", "w3")),
        ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", ("gate_proj", "up_proj", "down_proj")),
    )
    for name in names
)


def matches(fqn: str, pattern: str) -> bool:
    """Whether ``pattern`` matches the module name ``fqn`` or one of its dotted suffixes."""
    parts = fqn.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def matches_any(fqn: str, patterns: Iterable[str]) -> bool:
    return any(matches(fqn, p) for p in patterns)


def iter_linears(model) -> Iterator[tuple[str, object]]:
    """(fqn, module) for every nn.Linear of ``model`` (parametrized ones included)."""
    from torch import nn

    for fqn, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield fqn, module


def select_linears(model, patterns: Sequence[str], *, owner: str) -> list[tuple[str, object]]:
    """The Linear modules matched by ``patterns``; an error listing the candidates if none match."""
    from slimtrain.registry.errors import ConfigError

    linears = list(iter_linears(model))
    chosen = [(fqn, m) for fqn, m in linears if matches_any(fqn, patterns)]
    if not chosen:
        names = sorted({fqn.split(".")[-1] for fqn, _ in linears})
        raise ConfigError(
            f"[{owner}] targets = {list(patterns)!r} match no Linear layer of the model; "
            f"candidate names: {', '.join(names) or '(the model has no Linear layers)'}"
        )
    return chosen


def probe_overlap(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Module names (from LLaMA's projections and the patterns themselves) that both pattern sets
    match. Empty means no overlap was found; the converter re-checks on the real model."""
    probes = set(_PROBE_NAMES)
    for pattern in (*a, *b):
        probes.add(pattern.replace("*", "x").replace("?", "x"))
    return sorted(p for p in probes if matches_any(p, a) and matches_any(p, b))
