"""The plugin manager: built-in method plugins plus installed third-party ones, loaded once, lazily.

Third-party plugins are found through the entry point group ``slimtrain``. The environment variable
``SLIMTRAIN_LOAD_PLUGINS`` restricts which of them load: unset loads all; an empty string loads
none (built-ins only); a comma-separated list loads only the entry points (or distributions) named.
Built-ins always load: recipes and tests rely on them.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import threading

import pluggy

from slimtrain.registry import hookspecs
from slimtrain.registry.errors import CompositionError
from slimtrain.registry.method import Method, capability_problems

ENTRY_POINT_GROUP = "slimtrain"
LOAD_PLUGINS_ENV = "SLIMTRAIN_LOAD_PLUGINS"

# One module per built-in method, each written exactly as a third-party plugin would be.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "slimtrain.plugins.adamw",
    "slimtrain.plugins.low_rank",
    "slimtrain.plugins.lora",
    "slimtrain.plugins.sltrain",
    "slimtrain.plugins.refactorization",
    "slimtrain.plugins.lora_merge",
    "slimtrain.plugins.galore",
    "slimtrain.plugins.fira",
    "slimtrain.plugins.momentum_reset",
    "slimtrain.plugins.apollo",
    "slimtrain.plugins.muon",
    "slimtrain.plugins.scale",
    "slimtrain.plugins.sinkgd",
    "slimtrain.plugins.stable_spam",
    "slimtrain.plugins.adam_mini",
    "slimtrain.plugins.state_8bit",
    "slimtrain.plugins.per_layer_updates",
    "slimtrain.plugins.master_weights_bf16",
)

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_methods: dict[str, MethodInfo] | None = None


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """An installed method and where it came from ("built-in" or "<distribution> <version>")."""

    cls: type[Method]
    source: str
    plugin: str


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    wanted = os.environ.get(LOAD_PLUGINS_ENV)
    allowed = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        if allowed is not None and ep.name not in allowed and dist_name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        plugin = ep.load()
        pm.register(plugin, name=ep.name)
        source = f"{dist_name} {dist.version}" if dist is not None else ep.value
        pm._slimtrain_sources[ep.name] = source  # type: ignore[attr-defined]


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created and populated on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            pm.add_hookspecs(hookspecs)
            pm._slimtrain_sources = {}  # type: ignore[attr-defined]
            for module_name in BUILTIN_PLUGINS:
                module = importlib.import_module(module_name)
                pm.register(module, name=module_name)
                pm._slimtrain_sources[module_name] = "built-in"  # type: ignore[attr-defined]
            _load_entry_points(pm)
            _pm = pm
        return _pm


def get_methods() -> dict[str, MethodInfo]:
    """Name -> MethodInfo for every installed method, collected once."""
    global _methods
    with _lock:
        if _methods is None:
            _methods = collect_methods(get_plugin_manager())
        return _methods


def collect_methods(pm: pluggy.PluginManager) -> dict[str, MethodInfo]:
    methods: dict[str, MethodInfo] = {}
    sources = getattr(pm, "_slimtrain_sources", {})
    for plugin_name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue

        def register(cls: type[Method], _plugin_name: str = plugin_name) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
                raise TypeError(f"plugin {_plugin_name!r} registered {cls!r}: expected a named Method subclass")
            problems = capability_problems(cls)
            if problems:
                raise CompositionError(
                    f"method {cls.name!r} (plugin {_plugin_name!r}) {'; '.join(problems)}"
                )
            if cls.name in methods:
                other = methods[cls.name]
                raise CompositionError(
                    f"method {cls.name!r} is registered twice: by {other.plugin!r} and {_plugin_name!r}"
                )
            methods[cls.name] = MethodInfo(cls, sources.get(_plugin_name, "registered at run time"), _plugin_name)

        hook = pm.subset_hook_caller("register_methods", remove_plugins=[p for n, p in pm.list_name_plugin() if n != plugin_name])
        hook(register=register)
    return dict(sorted(methods.items()))


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object at run time (tests, notebooks); resets the method cache."""
    global _methods
    with _lock:
        get_plugin_manager().register(plugin, name=name)
        _methods = None


def unregister_plugin(name: str) -> None:
    global _methods
    with _lock:
        pm = get_plugin_manager()
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        _methods = None


def reset() -> None:
    """Forget the loaded plugins (tests that change SLIMTRAIN_LOAD_PLUGINS call this)."""
    global _pm, _methods
    with _lock:
        _pm = None
        _methods = None
