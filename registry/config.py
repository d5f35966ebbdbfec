"""Typed method configs: dataclasses filled from a TOML/CLI section, with errors that name the key.

A method's ``Config`` is a plain dataclass whose fields all have defaults. ``parse_config`` rejects
unknown keys (listing the allowed ones), coerces the simple types a command line produces (``"64"``
for an int field, ``"a,b"`` for a tuple of strings), and then calls the dataclass's own
``__post_init__``, where methods check ranges with ``check_range`` / ``check_choice``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from slimtrain.registry.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EmptyConfig:
    """Config of a method without settings."""


def config_fields(config_cls: type) -> list[dataclasses.Field]:
    """The dataclass fields of a method config, in declaration order."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")
    return list(dataclasses.fields(config_cls))


def config_defaults(config_cls: type) -> dict[str, Any]:
    """Field name -> default value, for listings and generated job-config sections."""
    out: dict[str, Any] = {}
    for f in config_fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def config_types(config_cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (string annotations evaluated)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints.get(f.name, Any) for f in config_fields(config_cls)}


def parse_config(config_cls: type, raw: Mapping[str, Any] | None, section: str) -> Any:
    """Build ``config_cls`` from ``raw``; every error names ``[section] key``."""
    raw = dict(raw or {})
    types = config_types(config_cls)
    unknown = sorted(set(raw) - set(types))
    if unknown:
        allowed = ", ".join(sorted(types)) or "(none: this method takes no settings)"
        raise ConfigError(
            f"[{section}] unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; allowed keys: {allowed}"
        )
    values = {key: _coerce(section, key, value, types[key]) for key, value in raw.items()}
    try:
        return config_cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{section}] {exc}") from exc


def _coerce(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Coerce CLI/TOML values to the field's type; refuse what cannot be converted."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if value is None and type(None) in args:
            return None
        if len(non_none) == 1:
            return _coerce(section, key, value, non_none[0])
        return value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"[{section}] {key} = {value!r}: expected a list")
        inner = args[0] if args else Any
        items = [_coerce(section, key, v.strip() if isinstance(v, str) else v, inner) for v in items if v != ""]
        return tuple(items) if origin is tuple else list(items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"[{section}] {key} = {value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"[{section}] {key} = {value!r}: expected an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"[{section}] {key} = {value!r}: expected an integer") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"[{section}] {key} = {value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"[{section}] {key} = {value!r}: expected a number") from None
    if annotation is str and not isinstance(value, str):
        raise ConfigError(f"[{section}] {key} = {value!r}: expected a string")
    return value


def check_range(
    section: str,
    key: str,
    value: float | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ConfigError naming ``[section] key``, the value and the allowed range."""
    if value is None:
        return
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        lb = "[" if low_inclusive and low is not None else "("
        rb = "]" if high_inclusive and high is not None else ")"
        raise ConfigError(f"[{section}] {key} = {value!r} is out of range; allowed: {lb}{lo}, {hi}{rb}")


def check_choice(section: str, key: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """Raise ConfigError naming ``[section] key``, the value and the allowed values."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"[{section}] {key} = {value!r} is not allowed; allowed values: {', '.join(map(repr, choices))}"
        )
