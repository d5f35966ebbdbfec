"""Recipes for ``slimtrain.prepare``: a TOML file (the same files torchtitan runs) or methods plus
sections, turned into a validated ``Composition`` and the optimizer settings it names.

Why its own module: the torchtitan integration reads recipes through torchtitan's job config; a
user of any other trainer has only the file (or a dict), and must get the same composition from
it, with the same errors (unknown method, bad key) before any model is touched.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from slimtrain.registry import Composition, ConfigError, OptimizerHyper, compose

#: [optimizer] keys of a recipe file that become OptimizerHyper fields
_HYPER_KEYS = {"lr": "lr", "eps": "eps", "weight_decay": "weight_decay", "implementation": "implementation"}


@dataclasses.dataclass
class Recipe:
    """Ordered method names, one config section per method, and the recipe's optimizer settings."""

    methods: list[str]
    sections: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)  # lr, betas, eps, weight_decay
    source: str = "(given)"

    def compose(self) -> Composition:
        return compose(self.methods, {m: self.sections.get(m, {}) for m in self.methods})

    def hyper(self, **given: Any) -> OptimizerHyper:
        """The recipe's optimizer settings, overridden by the ``given`` ones that are not None."""
        values = {**self.optimizer, **{k: v for k, v in given.items() if v is not None}}
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return OptimizerHyper(**values)


def _split_names(items) -> list[str]:
    if isinstance(items, str):
        items = [items]
    out: list[str] = []
    for item in items:
        out.extend(p.strip() for p in str(item).split(",") if p.strip())
    return out


def _from_toml(path: str) -> Recipe:
    import tomllib

    if not os.path.isfile(path):
        raise ConfigError(f"recipe file {path!r} does not exist")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    section = data.get("slimtrain")
    if not isinstance(section, dict) or "methods" not in section:
        raise ConfigError(f"recipe {path}: no [slimtrain] methods = [...] (the methods to compose)")
    methods = _split_names(section["methods"])
    opt = data.get("optimizer", {})
    optimizer = {field: opt[key] for key, field in _HYPER_KEYS.items() if key in opt}
    # torchtitan's defaults for what the file leaves out, so the file means what it means there
    optimizer["betas"] = (opt.get("beta1", 0.9), opt.get("beta2", 0.95))
    optimizer.setdefault("weight_decay", 0.1)
    sections = {m: dict(data.get(m, {})) for m in methods}
    return Recipe(methods, sections, optimizer, source=path)


def load_recipe(recipe, sections: Mapping[str, Mapping[str, Any]] | None = None) -> Recipe:
    """``recipe`` as a ``Recipe``: a path to a TOML recipe, a list of method names, a mapping
    ``{"methods": [...], "<method>": {...}}`` or a Recipe. ``sections`` override its keys per method."""
    if isinstance(recipe, Recipe):
        out = dataclasses.replace(recipe, sections={k: dict(v) for k, v in recipe.sections.items()})
    elif isinstance(recipe, (str, os.PathLike)) and (str(recipe).endswith(".toml") or os.sep in str(recipe)):
        out = _from_toml(os.fspath(recipe))
    elif isinstance(recipe, str):
        out = Recipe(_split_names(recipe))
    elif isinstance(recipe, Mapping):
        if "methods" not in recipe:
            raise ConfigError("recipe mapping has no 'methods' key: {'methods': ['sltrain', ...], 'sltrain': {...}}")
        rest = {k: dict(v) for k, v in recipe.items() if k not in ("methods", "optimizer")}
        out = Recipe(_split_names(recipe["methods"]), rest, dict(recipe.get("optimizer", {})))
    elif isinstance(recipe, Sequence):
        out = Recipe(_split_names(recipe))
    else:
        raise ConfigError(
            f"recipe of type {type(recipe).__name__}: give a TOML path, a list of method names or "
            f"{{'methods': [...], '<method>': {{...}}}}"
        )
    for name, values in (sections or {}).items():
        out.sections.setdefault(name, {}).update(values)
    stray = sorted(set(out.sections) - set(out.methods))
    if stray and sections:
        unlisted = sorted(set(sections) - set(out.methods))
        if unlisted:
            raise ConfigError(f"sections for {', '.join(unlisted)}, which the recipe's methods {out.methods} do not list")
    return out
