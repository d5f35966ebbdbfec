"""What a GPU holds while training one composition: weights, gradients, optimizer state, index
buffers and activations (the paper's table counts only weights and optimizer state).

Conventions (the paper's, extended):
* every weight, gradient and full-precision state element costs ``bytes_per_element`` (2, bf16);
  SLTrain's int64 support index and other buffers are the methods' own ``extra_bytes``;
* optimizer state is what each parameter's own update rule declares; with ``state_8bit`` every
  2-D+ ``moment=True`` declaration costs 1 byte per element plus a 4-byte scale per block
  (``plugins/state_8bit.py``), other state (projections, 1-D moments) full precision;
* gradients: one per trainable element, or with ``per_layer_updates`` only the largest trainable
  parameter's (each gradient is freed by its update before the next is produced; the upper bound
  of what is live at once);
* activations of a LLaMA decoder at ``batch x seq_len`` tokens, ``act_bytes`` per element, counting
  what eager PyTorch saves for backward per block: the attention-norm input and output (2h), q, k,
  v after RoPE (h + 2 kv), the attention output (h), the FFN-norm input and output (2h), and the
  SwiGLU's w1 and w3 outputs, silu(w1) and the product (4 f); attention by SDPA (flash / memory
  efficient on GPU: no s x s scores kept). ``none`` keeps every block's; ``full`` keeps each block's
  input (h) and one block's full set while it is recomputed; ``selective`` is torchtitan's
  ``layer`` mode with ``selective_ac_option = 2``: every second block checkpointed. The head adds
  the final norm (2h), the logits (V) and their fp32 copy for the loss (4 bytes x V).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from registry.method import ParamSpec

AC_MODES = ("none", "selective", "full")
STATE_8BIT = "state_8bit"
PER_LAYER = "per_layer_updates"


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    weights: int
    gradients: int
    optimizer: int
    index: int
    activations: int

    @property
    def static(self) -> int:
        """Weights + gradients + optimizer state + index buffers (no activations)."""
        return self.weights + self.gradients + self.optimizer + self.index

    @property
    def total(self) -> int:
        return self.static + self.activations


def _block_size(composition) -> int | None:
    if STATE_8BIT not in composition.method_names:
        return None
    return int(composition.method(STATE_8BIT).config.block_size)


def optimizer_state_bytes(composition, specs: Iterable[ParamSpec], *, bytes_per_element: int = 2) -> int:
    """Declared state of every trainable parameter's own rule, 8-bit where ``state_8bit`` stores it."""
    import math

    block = _block_size(composition)
    rules: dict[str, object] = {}
    total = 0
    for spec in specs:
        if not spec.trainable:
            continue
        owner = composition.owner_of(spec)
        rule = rules.get(owner.name)
        if rule is None:
            rule = rules[owner.name] = owner.update_rule()
        for decl in rule.state_specs(spec):
            if not decl.shape:
                continue  # scalars: bookkeeping (the paper's model does not count them)
            if block is not None and decl.moment and len(decl.shape) >= 2:
                rows = decl.numel // decl.shape[-1]
                total += decl.numel + 4 * rows * math.ceil(decl.shape[-1] / block)
            else:
                total += decl.numel * bytes_per_element
    return total


def gradient_bytes(composition, specs: Iterable[ParamSpec], *, bytes_per_element: int = 2) -> int:
    trainable = [s.numel for s in specs if s.trainable]
    if not trainable:
        return 0
    if PER_LAYER in composition.method_names:
        return max(trainable) * bytes_per_element
    return sum(trainable) * bytes_per_element


def activation_bytes(
    *, dim: int, ffn: int, layers: int, heads: int, vocab: int, batch: int, seq_len: int, ac: str = "none",
    kv_heads: int | None = None, act_bytes: int = 2,
) -> int:
    """Activations saved for backward (see the module docstring for what is counted)."""
    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing = {ac!r}; allowed: {', '.join(AC_MODES)}")
    tokens = batch * seq_len
    kv = dim // heads * (kv_heads or heads)
    block = (2 * dim + dim + 2 * kv + dim + 2 * dim + 4 * ffn) * tokens * act_bytes
    block_input = dim * tokens * act_bytes
    if ac == "none":
        blocks = layers * block
    elif ac == "full":
        blocks = layers * block_input + block
    else:
        kept = layers // 2  # every second block keeps its activations
        blocks = kept * block + (layers - kept) * block_input + block
    head = (2 * dim + vocab) * tokens * act_bytes + 4 * vocab * tokens
    return blocks + head


def device_memory(
    composition, dense: Iterable[ParamSpec], *, dim: int, ffn: int, layers: int, heads: int, vocab: int,
    batch: int, seq_len: int, ac: str = "none", bytes_per_element: int = 2, act_bytes: int | None = None,
) -> DeviceMemory:
    from registry.memory import transformed_specs

    specs, extra = transformed_specs(composition, dense)
    return DeviceMemory(
        weights=sum(s.numel for s in specs) * bytes_per_element,
        gradients=gradient_bytes(composition, specs, bytes_per_element=bytes_per_element),
        optimizer=optimizer_state_bytes(composition, specs, bytes_per_element=bytes_per_element),
        index=extra,
        activations=activation_bytes(
            dim=dim, ffn=ffn, layers=layers, heads=heads, vocab=vocab, batch=batch, seq_len=seq_len, ac=ac,
            act_bytes=act_bytes or bytes_per_element,
        ),
    )
