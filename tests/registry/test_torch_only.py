"""registry/ is the plugin contract: importable and usable with torch alone, never torchtitan.

Run in a fresh interpreter where importing torchtitan (or titan_integration) raises, so an import
arrow from registry/ to the integration, direct or through importlib, fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchtitan" or name.startswith("slimtrain.titan_integration"):
            raise ImportError(f"blocked in this test: {name}")
sys.meta_path.insert(0, Block())
"""

IMPORT_ALL = """
import pkgutil, importlib, slimtrain.registry
names = [m.name for m in pkgutil.iter_modules(slimtrain.registry.__path__, "slimtrain.registry.")]
for name in names:
    importlib.import_module(name)
from slimtrain.registry import compose, get_methods, llama_dense_specs
comp = compose(["galore"], {"galore": {"rank": 8}})
est = comp.estimate_memory(llama_dense_specs(64, 172, 2, 128, 4))
assert est.optimizer_state_elements > 0
print("OK", len(names), "modules,", len(get_methods()), "methods")
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_every_registry_module_imports_and_composes_without_torchtitan():
    proc = run(IMPORT_ALL)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr[-3000:]


def test_the_blocker_would_catch_a_torchtitan_import():
    proc = run("import slimtrain.titan_integration.converter")
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr


def test_no_registry_module_names_the_integration_in_code():
    """Also the hidden arrows: a module path in a string handed to importlib (as registry/cli.py
    once did for its subcommands) imports nothing at import time but is still a dependency.
    Docstrings and comments may mention torchtitan; code (strings included) may not."""
    import ast
    import io
    import tokenize

    offenders = []
    for path in sorted((ROOT / "registry").glob("*.py")):
        source = path.read_text()
        doc_lines = set()
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and node.body and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)
            ):
                doc = node.body[0].value
                doc_lines.update(range(doc.lineno, doc.end_lineno + 1))
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT or tok.start[0] in doc_lines:
                continue
            if "titan" in tok.string:
                offenders.append(f"{path.name}:{tok.start[0]}: {tok.string[:60]}")
    assert not offenders, offenders
