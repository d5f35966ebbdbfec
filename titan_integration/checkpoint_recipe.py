"""The recipe a checkpoint was trained with, saved next to it, and how two recipes differ.

Why: the state dict alone does not say which methods made it. torchtitan loads model state with
``strict=False``, so an SLTrain checkpoint resumed with ``--slimtrain.methods low_rank`` exited 0
with the sparse part and its index silently gone, and other mismatches (rank, density, optimizer)
failed with a bare key or shape error. Each checkpoint therefore carries ``RECIPE_FILE``: the
flavor, the methods in order with their resolved settings (every field of their ``Config``), and
the optimizer method; a resume compares it with the run's own and lists every difference.

Plain Python (no torch, no torchtitan).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

RECIPE_FILE = "slimtrain_recipe.json"
FORMAT = 1


def _plain(value: Any) -> Any:
    """JSON-comparable form (tuples become lists, as they do after a JSON round trip)."""
    return json.loads(json.dumps(value, default=str))


def recipe_of(flavor: str, composition) -> dict:
    settings = {}
    for method in composition.methods:
        config = method.config
        settings[method.name] = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    return _plain({
        "format": FORMAT,
        "flavor": flavor,
        "methods": composition.method_names,
        "settings": settings,
        "optimizer": composition.optimizer_method.name,
    })


def write_recipe(folder: str, recipe: dict) -> None:
    path = os.path.join(folder, RECIPE_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(recipe, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def read_recipe(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, RECIPE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON (so a NaN setting equals itself)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def differences(saved: dict | None, current: dict) -> list[str]:
    """One line per difference between the checkpoint's recipe ``saved`` and this run's."""
    if saved is None:
        return [f"the checkpoint records no recipe ({RECIPE_FILE} missing or unreadable)"]
    out = []
    if saved.get("flavor") != current["flavor"]:
        out.append(f"[model] flavor: {saved.get('flavor')!r} in the checkpoint, {current['flavor']!r} now")
    if saved.get("methods") != current["methods"]:
        out.append(f"[slimtrain] methods: {saved.get('methods')} in the checkpoint, {current['methods']} now")
    old_settings, new_settings = saved.get("settings") or {}, current["settings"]
    for name in current["methods"]:
        if name not in old_settings:
            continue
        old, new = old_settings[name], new_settings.get(name, {})
        for key in sorted(set(old) | set(new)):
            if not _same(old.get(key), new.get(key)):
                out.append(f"[{name}] {key}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    for name in saved.get("methods") or []:
        if name not in current["methods"]:
            out.append(f"method {name!r} of the checkpoint is not in this run (its weights and state would be dropped)")
    if saved.get("optimizer") != current["optimizer"]:
        out.append(f"optimizer method: {saved.get('optimizer')!r} in the checkpoint, {current['optimizer']!r} now")
    return out
