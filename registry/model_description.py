"""``ModelDescription``: the sizes of the model a composition trains, for methods that need them.

Why: a method sees Linear layers and parameter shapes, not the model's architecture. Some need
more (Adam-mini partitions attention weights by head, so it needs the head size); without a
description that reached them, such settings were hand-set config keys that mis-partition in
silence when wrong. ``slimtrain.prepare`` (and the torchtitan converter) infer the description
from the model, or take one given, and hand it to every method as ``method.model`` before the
model is parametrized.

Inference is duck-typed (no torchtitan or transformers import here): a Hugging Face ``config``
(``hidden_size``, ``num_attention_heads`` ...), torchtitan's ``model_args`` (``dim``, ``n_heads``
...), else what the modules show (the largest ``nn.Embedding`` gives vocabulary and hidden size).
Fields nothing could infer stay ``None``; a method that needs one says so by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimtrain.registry.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """Sizes of a decoder model; ``None`` where unknown (neither inferred nor given)."""

    hidden_size: int | None = None
    num_heads: int | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    num_kv_heads: int | None = None
    source: str = "given"  # where the sizes came from: "given", "hf config", "model args", "modules"

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_heads", "num_layers", "vocab_size", "num_kv_heads"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"model description: {f} = {v!r} must be a positive integer or None")
        if self.hidden_size and self.num_heads and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model description: hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int | None:
        """hidden_size / num_heads (the attention head size), or None when either is unknown."""
        if self.hidden_size is None or self.num_heads is None:
            return None
        return self.hidden_size // self.num_heads

    def require(self, *fields: str, method: str) -> None:
        """Raise naming ``method`` and each field it needs that is unknown (pass ``description=``)."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ConfigError(
                f"[{method}] needs the model's {', '.join(missing)}, which could not be inferred from the "
                f"model ({self.source}); pass description=ModelDescription(...) to slimtrain.prepare"
            )


_HF_KEYS = {
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "num_layers": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "num_kv_heads": "num_key_value_heads",
}
_ARGS_KEYS = {"hidden_size": "dim", "num_heads": "n_heads", "num_layers": "n_layers", "vocab_size": "vocab_size", "num_kv_heads": "n_kv_heads"}


def _read(obj: Any, keys: dict[str, str]) -> dict[str, int]:
    out = {}
    for field, attr in keys.items():
        v = getattr(obj, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            out[field] = v
    return out


def infer_description(model, given: ModelDescription | None = None) -> ModelDescription:
    """The description of ``model``; fields set in ``given`` win over inferred ones."""
    from torch import nn

    found: dict[str, int] = {}
    source = "modules"
    config = getattr(model, "config", None)
    args = getattr(model, "model_args", None)
    if config is not None and getattr(config, "hidden_size", None) is not None:
        found, source = _read(config, _HF_KEYS), "hf config"
    elif args is not None and getattr(args, "dim", None) is not None:
        found, source = _read(args, _ARGS_KEYS), "model args"
        if "num_kv_heads" not in found and "num_heads" in found:
            found["num_kv_heads"] = found["num_heads"]
    else:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if embeddings:
            biggest = max(embeddings, key=lambda e: e.num_embeddings)
            found["vocab_size"], found["hidden_size"] = biggest.num_embeddings, biggest.embedding_dim
        heads = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
        if heads:
            found["num_heads"] = heads[0]
            found["num_layers"] = len(heads)
    if given is not None:
        for f in _HF_KEYS:
            v = getattr(given, f)
            if v is not None:
                found[f] = v
        source = "given" if not found or all(getattr(given, f) is not None for f in found) else f"{source} + given"
    return ModelDescription(**found, source=source)
