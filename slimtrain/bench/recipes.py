"""Reading recipe TOMLs (``plugins/<name>.toml``) without starting torchtitan."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RECIPE_DIR = Path(__file__).resolve().parents[2] / "plugins"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    methods: list[str]
    sections: dict[str, dict[str, Any]]  # method name -> its config section
    raw: dict[str, Any]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path
    candidate = RECIPE_DIR / f"{name_or_path}.toml"
    if not candidate.exists():
        raise ValueError(f"unknown recipe {name_or_path!r}; available: {', '.join(available_recipes())}")
    return candidate


def load_recipe(name_or_path: str) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    methods = raw.get("slimtrain", {}).get("methods", [])
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise ValueError(f"{path}: [slimtrain] methods = {methods!r}: allowed: a list of method names, "
                         f'e.g. methods = ["sltrain"]')
    from slimtrain.registry import get_methods

    installed = get_methods()
    sections = {name: dict(raw[name]) for name in installed if name in raw and isinstance(raw[name], dict)}
    return Recipe(path.stem, path, methods, sections, raw)
