"""The pluggy contract between slimtrain and its method plugins.

A plugin is any module (or object) with functions marked ``@hookimpl``. It registers methods by
calling the ``register`` callback it is handed, in the style of simonw/llm's ``register_models``:
registration is explicit, so a plugin can register several methods, or none when a dependency of
its own is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from slimtrain.registry.method import Method

PROJECT_NAME = "slimtrain"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_methods(register: Callable[[type[Method]], None]) -> None:
    """Register method classes: call ``register(MyMethod)`` once per ``Method`` subclass."""
