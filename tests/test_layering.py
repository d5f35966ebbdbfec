"""The layering rules of DEVELOPERS.md that code can check: only titan_integration/ imports
torchtitan (benchmarks, plugins and registry reach it through titan_integration)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchtitan_imports(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] == "torchtitan" for n in names):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("folder", ["benchmarks", "plugins", "registry"])
def test_only_titan_integration_imports_torchtitan(folder):
    offenders = {
        str(p.relative_to(ROOT)): lines
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (lines := torchtitan_imports(p))
    }
    assert not offenders, f"torchtitan imported outside titan_integration/: {offenders}"
