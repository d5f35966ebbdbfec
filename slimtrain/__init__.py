"""slimtrain: composable memory-efficient pretraining methods as plugins.

One import root. Plugin authors need only what is exported here::

    from slimtrain import Capability, Method, UpdateRule, StateSpec, hookimpl

Users of any trainer prepare a model with one call (``slimtrain.api``)::

    prepared = slimtrain.prepare(model, "plugins/sltrain.toml")

The repository keeps ``registry/``, ``plugins/`` and ``titan_integration/`` at its top; the
installed distribution maps them to ``slimtrain.registry``, ``slimtrain.plugins`` and
``slimtrain.titan_integration`` (pyproject.toml's ``package-dir``) and each refuses to be imported
under its bare folder name, so no module is importable under two names.

Nothing imported here touches torchtitan.
"""

from slimtrain.registry import *  # noqa: F401,F403  (the contract, re-exported at the root)
from slimtrain.registry import __all__ as _registry_all
from slimtrain.registry.parametrization import (
    capturing_init,
    iter_parametrized,
    originals,
    seeded_generator,
)
from slimtrain.registry.composed_optimizer import StateCodec
from slimtrain.registry.sharded import OwnerRanks, RowShards
from slimtrain.registry.targets import matches_any
from slimtrain.registry.tensors import full_tensor, is_dtensor, local_tensor, write_full_
from slimtrain.registry.update_rule import OnReset, RuleParam, StateSpec, StepInfo, UpdateRule

from slimtrain.api import Prepared, prepare
from slimtrain.recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = sorted(
    set(_registry_all)
    | {
        "OnReset",
        "Prepared",
        "Recipe",
        "load_recipe",
        "prepare",
        "OwnerRanks",
        "RowShards",
        "RuleParam",
        "StateCodec",
        "StateSpec",
        "StepInfo",
        "UpdateRule",
        "capturing_init",
        "full_tensor",
        "is_dtensor",
        "iter_parametrized",
        "local_tensor",
        "matches_any",
        "originals",
        "seeded_generator",
        "write_full_",
    }
)
