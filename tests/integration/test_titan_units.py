"""titan_integration's pieces checked in one fresh process (see unit_checks.py for why)."""

from __future__ import annotations

import json

import pytest

from .helpers import HERE, python

CHECKS = [
    "check_cpu_shim",
    "check_flavors_match_paper",
    "check_job_config_sections_mirror_methods",
    "check_cli_overrides_and_unknown_keys",
    "check_every_recipe_composes",
    "check_lr_factor_and_true_step_after_resume",
    "check_memory_breakdown",
    "check_run_defaults",
]


@pytest.fixture(scope="module")
def unit_results() -> dict:
    proc = python(str(HERE / "unit_checks.py"), [])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", CHECKS)
def test_unit(unit_results, name):
    assert name in unit_results, f"{name} did not run"
    assert unit_results[name] is None, unit_results[name]
