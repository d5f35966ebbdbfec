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


@pytest.mark.parametrize("folder", ["benchmarks", "plugins", "registry", "slimtrain"])
def test_only_titan_integration_imports_torchtitan(folder):
    offenders = {
        str(p.relative_to(ROOT)): lines
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (lines := torchtitan_imports(p))
    }
    assert not offenders, f"torchtitan imported outside titan_integration/: {offenders}"


@pytest.mark.parametrize("folder", ["registry", "plugins", "titan_integration"])
def test_folders_import_under_one_name(folder):
    """A checkout on sys.path must not make ``registry`` importable beside ``slimtrain.registry``."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", f"import {folder}"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert f"import slimtrain.{folder}, not {folder}" in proc.stderr


def test_root_exports_what_the_guide_imports():
    """Every name docs/writing-a-method-plugin.md and the example distributions import from
    slimtrain is exported by the root, and nothing there imports a registry submodule."""
    import slimtrain

    sources = [ROOT / "docs" / "writing-a-method-plugin.md", *sorted((ROOT / "examples").rglob("*.py"))]
    names = set()
    for path in sources:
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            assert not line.startswith("from slimtrain.registry"), f"{path}: {line}"
            if line.startswith("from slimtrain import "):
                names |= {n.strip(" ()") for n in line[len("from slimtrain import "):].split(",") if n.strip(" ()")}
    assert names, "the guide and the examples import nothing from slimtrain"
    missing = sorted(n for n in names if not hasattr(slimtrain, n))
    assert not missing, missing
