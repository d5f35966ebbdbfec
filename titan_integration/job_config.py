"""torchtitan ``[job] custom_config_module``: the ``[slimtrain]`` section plus one section per method.

torchtitan merges this module's ``JobConfig`` dataclass into its own, so every field here becomes a
TOML key and a ``--section.key`` CLI flag (CLI > TOML > defaults), with torchtitan's own checks:
an unknown TOML key raises ValueError, an unknown CLI flag exits with status 2.

The per-method sections are generated from the registry: each installed method's ``Config``
dataclass is mirrored field by field (same names, types, defaults), so a newly installed plugin
gets its ``[name]`` section and ``--name.key`` flags with no change here. The values are not
validated here: ``slimtrain.registry.compose`` parses them with the method's own ``Config`` (types, ranges)
when the converter is built, i.e. before any model exists, and its ConfigError is what the user
sees.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field, make_dataclass
from typing import Any

# Sections torchtitan already owns; a method with one of these names would silently merge into them.
_RESERVED = {
    "job", "profiling", "metrics", "model", "optimizer", "lr_scheduler", "training", "parallelism",
    "checkpoint", "activation_checkpoint", "compile", "quantize", "comm", "memory_estimation",
    "fault_tolerance", "experimental", "validation", "debug", "slimtrain",
}


def _lists_to_tuples(section: Any) -> None:
    """``__post_init__`` of every slimtrain section: a TOML list given for a ``tuple[...]`` key
    becomes a tuple, so the value matches its annotation (tyro warns about the mismatch
    otherwise, since torchtitan makes TOML values the defaults of its CLI parser)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, list) and typing.get_origin(hints.get(f.name)) is tuple:
            setattr(section, f.name, tuple(value))


@dataclasses.dataclass
class Slimtrain:
    """The ``[slimtrain]`` section."""

    __post_init__ = _lists_to_tuples

    methods: tuple[str, ...] = ()
    """Methods to compose, in order (e.g. ["sltrain", "refactorization", "momentum_reset"]).
    Empty: full-rank AdamW. On the CLI: --slimtrain.methods sltrain refactorization (or
    sltrain,refactorization)"""

    warmup_fraction: float = -1.0
    """If >= 0, lr_scheduler.warmup_steps is set to round(warmup_fraction * total steps) (total:
    lr_scheduler.total_steps if set, else training.steps), so the papers' "10% warmup" follows
    --training.steps overrides. Negative: use lr_scheduler.warmup_steps as given."""

    data_dir: str = ""
    """Where the embedded default corpus and tokenizer live (prepared on first run). Empty: the
    corpus package's default location."""

    memory_report: bool = True
    """Log a memory breakdown (parameters, gradients, optimizer state, peak) once, after step 1."""

    cpu_mixed_precision: bool = False
    """On a machine without a GPU, keep the recipe's mixed precision (FSDP2 parameters in bf16,
    reduction as [training] says) instead of training in fp32: runs the GPU path on CPU (tests,
    debugging). Off by default because bf16 matmuls are slow on most CPUs. gloo reduces bf16
    gradients (checked at 1 and 2 ranks); ``training.dtype`` (full bf16 training without FSDP's
    mixed precision) stays fp32 on CPU either way."""

    loss_log: str = ""
    """If set, rank 0 appends one JSON line per step ({"step", "loss"}, the exact global loss) and
    per validation ({"step", "val_loss", "val_perplexity"}) to this file (resume checks, plots)."""

    checkpoint_on_damage: str = "stop"
    """When a checkpoint file does not match the checksum recorded at save (a flipped byte, a
    truncated file): "stop" (the run stops naming the file) or "fallback" (resume from the previous
    intact checkpoint). A checkpoint without its checksum file (a save that did not finish) is
    always skipped with a warning."""

    resume_weights_only: bool = False
    """Resume from a checkpoint written by another recipe (methods, their settings, flavor or
    optimizer): load only the model weights whose names and shapes match, start at step 1 with a
    new optimizer, and list what is dropped. Without it such a resume is refused, listing the
    differences."""


def register_cli_rules() -> None:
    """Let every ``tuple[str, ...]`` key (``[slimtrain] methods``, methods' ``targets`` and
    ``roles``) take a TOML list, and on the command line several values, comma- or space-separated
    (``--slimtrain.methods galore fira``, ``--galore.targets "*.wq,*.wk"``), without warnings.

    Why a rule of our own: torchtitan's rule for ``list[str]`` takes exactly one comma-separated
    token (``galore fira`` fails with "Unrecognized options"), and tyro warns when a TOML list
    becomes the default of a tuple-typed key. Rules live in torchtitan's tyro registry, which its
    ConfigManager uses for parsing; this module is imported (as ``custom_config_module``) before it
    parses, and torchtitan has no rule of its own for tuples, so this one applies.
    """
    from slimtrain.titan_integration import cpu_shim

    cpu_shim.apply()
    import tyro
    from torchtitan.config.manager import custom_registry

    if getattr(custom_registry, "_slimtrain_rules", False):
        return

    @custom_registry.primitive_rule
    def str_tuple_rule(type_info):
        if type_info.type != tuple[str, ...]:
            return None
        return tyro.constructors.PrimitiveConstructorSpec(
            nargs="*",
            metavar="A[,B] [C ...]",
            instance_from_str=lambda args: tuple(x.strip() for a in args for x in a.split(",") if x.strip()),
            is_instance=lambda value: isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
            str_from_instance=lambda value: [str(v) for v in value],
        )

    custom_registry._slimtrain_rules = True


def register_toml_key_check() -> None:
    """An unknown TOML key or section is refused naming it, its section and the allowed keys.

    Why: torchtitan's own message (``Invalid field names in <class ...>``) names neither the
    section nor the keys it would take, and points at ``./run_train.sh``, which slimtrain does not
    have. This replaces ``ConfigManager._dict_to_dataclass`` (same conversion) with one that knows
    where it is; it is installed when torchtitan imports this module, before the TOML is converted.
    """
    from slimtrain.registry import ConfigError
    from torchtitan.config.manager import ConfigManager

    if getattr(ConfigManager, "_slimtrain_toml_check", False):
        return

    def convert(self, cls, data, _where: str = ""):
        if not dataclasses.is_dataclass(cls) or not isinstance(data, dict):
            return data
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            what = f"key(s) {', '.join(unknown)} in [{_where}]" if _where else f"section(s) [{'], ['.join(unknown)}]"
            raise ConfigError(f"unknown TOML {what}; allowed: {', '.join(sorted(valid))} "
                              f"(titan_integration/train.py --help lists every key)")
        result = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if dataclasses.is_dataclass(f.type) and isinstance(value, dict):
                    inner = f"{_where}.{f.name}" if _where else f.name
                    result[f.name] = convert(self, f.type, value, inner)
                else:
                    result[f.name] = value
        return cls(**result)

    ConfigManager._dict_to_dataclass = convert
    ConfigManager._slimtrain_toml_check = True


def _field_spec(f: dataclasses.Field, annotation: Any) -> tuple[str, Any, dataclasses.Field]:
    if f.default is not dataclasses.MISSING:
        default = f.default
        if isinstance(default, (list, dict, set)):
            value = default
            return f.name, annotation, field(default_factory=lambda v=value: type(v)(v))
        return f.name, annotation, field(default=default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.name, annotation, field(default_factory=f.default_factory)  # type: ignore[misc]
    raise TypeError(f"method config field {f.name!r} has no default")


def _section_class(method_name: str, config_cls: type) -> type:
    hints = typing.get_type_hints(config_cls)
    specs = [_field_spec(f, hints.get(f.name, Any)) for f in dataclasses.fields(config_cls)]
    cls_name = "".join(part.capitalize() for part in method_name.split("_")) + "Section"
    section = make_dataclass(cls_name, specs, namespace={"__post_init__": _lists_to_tuples})
    section.__doc__ = f"[{method_name}] settings (mirrors {config_cls.__module__}.{config_cls.__qualname__})"
    return section


def method_sections() -> dict[str, type]:
    """Method name -> generated section dataclass, for every installed method."""
    from slimtrain.registry import get_methods

    out: dict[str, type] = {}
    for name, info in get_methods().items():
        if not name.isidentifier():
            raise ValueError(f"method name {name!r} cannot be a config section (not an identifier)")
        if name in _RESERVED:
            raise ValueError(f"method name {name!r} collides with a torchtitan config section")
        out[name] = _section_class(name, info.cls.Config)
    return out


def build_job_config_class() -> type:
    specs: list[tuple[str, Any, dataclasses.Field]] = [
        ("slimtrain", Slimtrain, field(default_factory=Slimtrain)),
    ]
    for name, section in method_sections().items():
        specs.append((name, section, field(default_factory=section)))
    return make_dataclass("JobConfig", specs)


def section_values(job_config: Any, method_name: str) -> dict[str, Any]:
    """The raw values of ``[method_name]`` from a parsed job config (empty if no such section)."""
    section = getattr(job_config, method_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        return {}
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def non_default_keys(job_config: Any, method_name: str) -> list[str]:
    """Keys of ``[method_name]`` whose value differs from the default (to warn about settings of
    methods that are not in ``[slimtrain] methods`` and so have no effect)."""
    section = getattr(job_config, method_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        return []
    default = type(section)()
    return [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name)]


register_cli_rules()
register_toml_key_check()
JobConfig = build_job_config_class()
