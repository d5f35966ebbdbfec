"""Plugin discovery: built-ins, the example third-party distribution, the blocking variable, and
plugins registered at run time (and unregistered after)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from registry import CompositionError, compose, hookimpl
from registry.manager import BUILTIN_PLUGINS, LOAD_PLUGINS_ENV

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "slimtrain-example-plugin"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """The example plugin pip-installed (with its entry point) into a private folder."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source)  # setuptools builds in the source tree: keep the repo clean
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
    )
    return target


def _run(code: str, site: Path | None, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != LOAD_PLUGINS_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site) if site else "", str(ROOT)) if p)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)


LIST = "from titan_integration.cli import main; main(['list', '--json'])"


def _listed(proc) -> dict[str, dict]:
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_builtins_listed_with_source_and_keys(fresh_registry):
    methods = fresh_registry.get_methods()
    assert methods["adamw"].source == "built-in"
    modules = {info.plugin for info in methods.values()}
    assert modules <= set(BUILTIN_PLUGINS) | {"decay_exempt"}


def test_example_plugin_listed_with_its_distribution(example_site):
    rows = _listed(_run(LIST, example_site))
    row = rows["decay_exempt"]
    assert row["source"] == "slimtrain-example-plugin 0.1.0"
    assert row["capabilities"] == ["param_groups"]
    assert row["config"]["exempt_1d"] == {"type": "bool", "default": True}
    assert rows["adamw"]["source"] == "built-in"


@pytest.mark.parametrize("value, loaded", [("", False), ("something_else", False), ("decay_exempt", True), ("slimtrain-example-plugin", True)])
def test_environment_variable_restricts_third_party_plugins(example_site, value, loaded):
    rows = _listed(_run(LIST, example_site, {LOAD_PLUGINS_ENV: value}))
    assert ("decay_exempt" in rows) is loaded
    assert "adamw" in rows  # built-ins always load


def test_example_plugin_composes_and_sets_group_options(example_site):
    code = """
import torch
from registry import compose
comp = compose(['decay_exempt'], {'decay_exempt': {'weight_decay': 0.0}})
model = torch.nn.ModuleDict({'attention_norm': torch.nn.LayerNorm(4), 'wq': torch.nn.Linear(4, 4)})
groups = comp.param_groups(model)
print(sorted((str(g.get('weight_decay', 'default')), len(g['params'])) for g in groups))
print(comp.method_names)
"""
    proc = _run(code, example_site)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    # norm weight + norm bias + wq bias exempt; wq weight keeps the default
    assert lines[0] == "[('0.0', 3), ('default', 1)]"
    assert lines[1] == "['decay_exempt', 'adamw']"


def test_blocked_example_plugin_is_unknown_to_compose(example_site):
    proc = _run("from registry import compose; compose(['decay_exempt'], {})", example_site, {LOAD_PLUGINS_ENV: ""})
    assert proc.returncode != 0
    assert "unknown method 'decay_exempt'; installed methods: adamw" in proc.stderr


class _Dup:
    @hookimpl
    def register_methods(self, register):
        from plugins.adamw import AdamW

        register(AdamW)


def test_duplicate_method_name_is_an_error(fresh_registry):
    fresh_registry.register_plugin(_Dup(), name="dup")
    try:
        with pytest.raises(CompositionError, match="'adamw' is registered twice: by 'plugins.adamw' and 'dup'"):
            fresh_registry.get_methods()
    finally:
        fresh_registry.unregister_plugin("dup")
    assert "adamw" in fresh_registry.get_methods()


def test_runtime_plugin_is_gone_after_unregister(fresh_registry):
    from tests.registry.fakes import FakePlugin

    fresh_registry.register_plugin(FakePlugin(), name="fakes")
    assert "fake_factor" in fresh_registry.get_methods()
    fresh_registry.unregister_plugin("fakes")
    assert "fake_factor" not in fresh_registry.get_methods()
    with pytest.raises(CompositionError, match="unknown method 'fake_factor'"):
        compose(["fake_factor"])


def test_slimtrain_list_text_shows_keys():
    proc = subprocess.run([sys.executable, "-m", "titan_integration.cli", "list"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "adamw  (built-in)" in proc.stdout
    assert "capabilities: optimizer" in proc.stdout


@pytest.mark.parametrize(
    "provides,hooks,message",
    [
        ({"STEP_HOOK"}, {}, r"declares STEP_HOOK but does not implement after_step\(\)"),
        (set(), {"lr_factor": lambda self, step: 0.5}, r"implements lr_factor\(\) but does not declare LR_SCHEDULE"),
        ({"FACTORIZED"}, {}, "declares FACTORIZED without PARAMETRIZATION"),
    ],
    ids=["capability-without-hook", "hook-without-capability", "trait-without-parametrization"],
)
def test_registration_checks_capabilities_against_hooks(fresh_registry, provides, hooks, message):
    from registry import Capability, Method, hookimpl

    cls = type("Inconsistent", (Method,), {
        "name": "inconsistent", "provides": frozenset(Capability[c] for c in provides), **hooks,
    })

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(cls)

    fresh_registry.register_plugin(Plugin(), name="inconsistent_plugin")
    try:
        with pytest.raises(TypeError, match=rf"method 'inconsistent' .*{message}"):
            fresh_registry.get_methods()
    finally:
        fresh_registry.unregister_plugin("inconsistent_plugin")


def test_every_module_in_plugins_is_a_method_plugin():
    """plugins/ holds one module (or package) per built-in method, each registering methods;
    shared machinery lives in registry/ or inside the method that owns it."""
    import importlib
    import pkgutil

    import plugins
    from registry.manager import BUILTIN_PLUGINS

    modules = {f"plugins.{m.name}" for m in pkgutil.iter_modules(plugins.__path__)}
    assert modules == set(BUILTIN_PLUGINS), sorted(modules ^ set(BUILTIN_PLUGINS))
    for name in sorted(modules):
        assert hasattr(importlib.import_module(name), "register_methods"), f"{name} registers no method"
