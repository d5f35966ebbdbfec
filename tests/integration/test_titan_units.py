"""titan_integration's pieces checked in one fresh process (see unit_checks.py for why)."""

from __future__ import annotations

import ast
import json

import pytest

from .helpers import HERE, python


def collect_checks() -> list[str]:
    """Every top-level ``check_*`` function of unit_checks.py, read from its source (importing it
    here would import torchtitan into the test process): a new check is asserted without being
    listed anywhere."""
    tree = ast.parse((HERE / "unit_checks.py").read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("check_")]


CHECKS = collect_checks()


def test_the_checks_are_collected():
    assert len(CHECKS) >= 8 and "check_cpu_shim" in CHECKS


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
