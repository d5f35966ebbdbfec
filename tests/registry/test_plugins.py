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

from slimtrain.registry import CompositionError, compose, hookimpl
from slimtrain.registry.manager import BUILTIN_PLUGINS, LOAD_PLUGINS_ENV

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


LIST = "from slimtrain.cli import main; main(['list', '--json'])"


def _listed(proc) -> dict[str, dict]:
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


def test_builtins_listed_with_source_and_keys(fresh_registry):
    """Holds whatever third-party plugins are installed (one is registered here to make sure)."""
    from tests.registry.fakes import FakePlugin

    fresh_registry.register_plugin(FakePlugin(), name="fakes")
    try:
        methods = fresh_registry.get_methods()
        builtin = {name: info for name, info in methods.items() if info.source == "built-in"}
        assert {info.plugin for info in builtin.values()} == set(BUILTIN_PLUGINS)
        assert {"adamw", "galore", "fira", "sltrain", "momentum_reset"} <= set(builtin)
        assert all(info.plugin not in BUILTIN_PLUGINS for info in methods.values() if info.source != "built-in")
        assert methods["fake_opt"].source == "registered at run time"
    finally:
        fresh_registry.unregister_plugin("fakes")


class _BadCapabilities:
    def __init__(self, cls):
        self.cls = cls

    @hookimpl
    def register_methods(self, register):
        register(self.cls)


def _bad_methods():
    from slimtrain.registry import Capability, Method

    class NoHook(Method):
        name = "no_hook"
        provides = frozenset({Capability.STEP_HOOK})

    class Undeclared(Method):
        name = "undeclared"

        def lr_factor(self, step):
            return 0.5

    class NoEstimate(Method):
        name = "no_estimate"
        provides = frozenset({Capability.OPTIMIZER})

        def update_rule(self):
            raise AssertionError

    class OldOptimizer(Method):
        name = "old_optimizer"
        provides = frozenset({Capability.PARAM_GROUPS})

        def param_group_options(self, spec):
            return None

        def build_optimizer(self, groups, hyper):
            raise AssertionError

    return [
        (NoHook, "declares Capability.STEP_HOOK but does not implement after_step()"),
        (Undeclared, "overrides lr_factor() but does not declare Capability.LR_SCHEDULE"),
        (NoEstimate, "Capability.MEMORY_ESTIMATE must be declared exactly by methods with PARAMETRIZATION or OPTIMIZER"),
        (OldOptimizer, "defines build_optimizer(), which slimtrain no longer calls"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_capabilities_out_of_step_with_hooks_fail_at_registration_naming_the_method(fresh_registry, index):
    cls, needle = _bad_methods()[index]
    fresh_registry.register_plugin(_BadCapabilities(cls), name="bad_caps")
    try:
        with pytest.raises(CompositionError) as err:
            fresh_registry.get_methods()
        assert f"method {cls.name!r} (plugin 'bad_caps')" in str(err.value) and needle in str(err.value)
    finally:
        fresh_registry.unregister_plugin("bad_caps")


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
from slimtrain.registry import compose
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
    proc = _run("from slimtrain.registry import compose; compose(['decay_exempt'], {})", example_site, {LOAD_PLUGINS_ENV: ""})
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert "unknown method 'decay_exempt'; installed methods: " in message
    installed = message.split("installed methods: ")[1].split(", ")
    assert "adamw" in installed and "decay_exempt" not in installed


class _Dup:
    @hookimpl
    def register_methods(self, register):
        from slimtrain.plugins.adamw import AdamW

        register(AdamW)


def test_duplicate_method_name_is_an_error(fresh_registry):
    fresh_registry.register_plugin(_Dup(), name="dup")
    try:
        with pytest.raises(CompositionError, match="'adamw' is registered twice: by 'slimtrain.plugins.adamw' and 'dup'"):
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
    proc = subprocess.run([sys.executable, "-m", "slimtrain.cli", "list"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "adamw  (built-in)" in proc.stdout
    assert "capabilities: memory_estimate, optimizer" in proc.stdout


def test_every_module_in_plugins_is_a_method_plugin():
    """plugins/ holds one module (or package) per built-in method, each registering methods;
    shared machinery lives in registry/ or inside the method that owns it."""
    import importlib
    import pkgutil

    import slimtrain.plugins
    from slimtrain.registry.manager import BUILTIN_PLUGINS

    modules = {f"slimtrain.plugins.{m.name}" for m in pkgutil.iter_modules(slimtrain.plugins.__path__)}
    assert modules == set(BUILTIN_PLUGINS), sorted(modules ^ set(BUILTIN_PLUGINS))
    for name in sorted(modules):
        assert hasattr(importlib.import_module(name), "register_methods"), f"{name} registers no method"
