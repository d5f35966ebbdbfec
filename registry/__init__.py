"""slimtrain's plugin contract: hook specs, the plugin manager, the method model and composition.

Plugin authors need only what is exported here::

    from registry import Capability, Method, hookimpl

Nothing in this package imports torchtitan: methods are plain torch and can serve other trainers.
"""

from registry.composition import Composition, compose
from registry.config import EmptyConfig, check_choice, check_range, parse_config
from registry.errors import CompositionError, ConfigError, SlimtrainError
from registry.hookspecs import hookimpl, hookspec
from registry.manager import MethodInfo, get_methods, get_plugin_manager, register_plugin, unregister_plugin
from registry.memory import MemoryEstimate, estimate_memory, llama_dense_specs
from registry.method import (
    Capability,
    HookStage,
    Method,
    OptimizerHyper,
    ParamSpec,
    Requirement,
    StepContext,
)
from registry.parametrization import FactorizedParametrization, LinearParametrization
from registry.targets import DEFAULT_TARGETS

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
    "OptimizerHyper",
    "ParamSpec",
    "Requirement",
    "SlimtrainError",
    "StepContext",
    "check_choice",
    "check_range",
    "compose",
    "estimate_memory",
    "get_methods",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "llama_dense_specs",
    "parse_config",
    "register_plugin",
    "unregister_plugin",
]
