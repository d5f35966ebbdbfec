"""slimtrain's plugin contract: hook specs, the plugin manager, the method model and composition.

Plugin authors need only what is exported here::

    from slimtrain.registry import Capability, Method, hookimpl

Nothing in this package imports torchtitan: methods are plain torch and can serve other trainers.
"""

if __name__ != "slimtrain.registry":  # one import name: the folder is slimtrain.registry once installed
    raise ImportError(
        f"import slimtrain.registry, not {__name__}: slimtrain's modules have one import name "
        "(install the project with `pip install -e .`, or run scripts/setup.sh)"
    )

from slimtrain.registry.composition import Composition, compose
from slimtrain.registry.config import EmptyConfig, check_choice, check_range, parse_config
from slimtrain.registry.errors import CompositionError, ConfigError, SlimtrainError
from slimtrain.registry.hookspecs import hookimpl, hookspec
from slimtrain.registry.manager import MethodInfo, get_methods, get_plugin_manager, register_plugin, unregister_plugin
from slimtrain.registry.memory import MemoryEstimate, estimate_memory, llama_dense_specs
from slimtrain.registry.method import (
    Capability,
    HookStage,
    Method,
    OptimizerHyper,
    ParamSpec,
    Requirement,
    StepContext,
    TrainerSettings,
)
from slimtrain.registry.model_description import ModelDescription, infer_description
from slimtrain.registry.parametrization import FactorizedParametrization, LinearParametrization
from slimtrain.registry.targets import DEFAULT_TARGETS

__all__ = [
    "Capability",
    "Composition",
    "CompositionError",
    "ConfigError",
    "DEFAULT_TARGETS",
    "EmptyConfig",
    "FactorizedParametrization",
    "HookStage",
    "LinearParametrization",
    "MemoryEstimate",
    "Method",
    "MethodInfo",
    "ModelDescription",
    "OptimizerHyper",
    "ParamSpec",
    "Requirement",
    "SlimtrainError",
    "StepContext",
    "TrainerSettings",
    "check_choice",
    "check_range",
    "compose",
    "estimate_memory",
    "get_methods",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "infer_description",
    "llama_dense_specs",
    "parse_config",
    "register_plugin",
    "unregister_plugin",
]
