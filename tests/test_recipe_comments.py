"""Recipe headers show the CPU command as a user should type it: with a CPU flavor, whose run
defaults (titan_integration/run_defaults.py) already set the batch and interval keys, so the
example must not repeat them (stale copies drift from the defaults)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slimtrain.titan_integration.run_defaults import RUN_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "plugins").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_cpu_example_repeats_no_flavor_run_default(recipe):
    header = "\n".join(line for line in recipe.read_text().splitlines() if line.startswith("#"))
    flavors = set(re.findall(r"--model\.flavor (\w+)", header))
    keys = set(re.findall(r"--([a-z_]+\.[a-z_]+)", header))
    for flavor in flavors & set(RUN_DEFAULTS):
        repeated = sorted(keys & set(RUN_DEFAULTS[flavor]))
        assert not repeated, f"{recipe.name}: the {flavor} flavor sets {repeated} itself"
