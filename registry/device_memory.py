"""What a device holds while training one composition: weights, gradients, optimizer state, index
buffers, activations, and the PEAK of one training step (the paper's table counts only weights and
optimizer state). Validated against torch's MemTracker on CPU (benchmarks/memory_tracker.py,
tests/methods/test_memory_tracker.py, docs/benchmarks/memory_model_vs_memtracker.md).

Conventions (the paper's, extended):
* every weight, gradient and full-precision state element costs ``bytes_per_element`` (2, bf16);
  SLTrain's int64 support index and other buffers are the methods' own ``extra_bytes``;
* optimizer state is what each parameter's own update rule declares; with ``state_8bit`` every
  2-D+ ``moment=True`` declaration costs 1 byte per element plus a 4-byte scale per block
  (``plugins/state_8bit.py``), other state (projections, 1-D moments) full precision;
* gradients: one per trainable element, or with ``per_layer_updates`` only the largest trainable
  parameter's (each gradient is freed by its update before the next is produced).

Activations (``activations``: what backward keeps at the end of the forward and loss) of a LLaMA
decoder at ``batch x seq_len`` tokens, ``act_bytes`` per element, as eager PyTorch saves them per
block (listed with ``torch.autograd.graph.saved_tensors_hooks`` on torchtitan's block): the block
input, each RMSNorm's output, q, k and v after RoPE (h + 2 kv), SDPA's output (h) and log-sum-exp
(fp32, one per head and token; flash / CPU flash attention: no s x s scores), the residual sum
(h), the SwiGLU's w1 and w3 outputs, silu(w1) and the product (4 f), and each norm's fp32 rstd.
RMSNorm differs by device BY CONSTRUCTION: on CUDA ``F.rms_norm`` runs the fused kernel, which
saves its input and rstd (the output is saved by the next linear); on CPU (torch 2.11-2.14 has no
fused CPU kernel) the composite also saves ``x * rstd``: one more h per norm. ``device="cuda"``
(the default: the GPU claim) or ``"cpu"`` (what the MemTracker test checks). Per block: 6h + 2kv +
4f on CUDA, 8h + 2kv + 4f on CPU. The head keeps the final norm's tensors and the fp32
log-softmax of the logits (4 bytes x V per token: the loss casts the logits to fp32; the logits
themselves are not kept). Checkpointing (torchtitan's wrappers): ``full`` keeps each block's input
only; ``selective`` is torchtitan's layer mode with ``selective_ac_option = "2"`` (every second
block, counting from 1, is checkpointed); ``none`` keeps every block's.

The peak (``peak``) is the largest of these moments of a step, each the static memory (weights,
index, optimizer state, the model's small buffers excluded) plus what is alive then:
* ``loss``: the activations plus the loss's logit-sized tensors, at log-softmax's backward: its
  saved output, the incoming gradient and the outgoing one (3 x 4 bytes x V per token: fp32);
* ``block i``: backward through block i (last first): the activations not yet freed, block i's
  recomputed set (when checkpointed, less its saved input), the SwiGLU's backward temporaries
  (the incoming h-gradient and three f-sized gradients, less the product already freed: h + 2f),
  and the gradients produced so far (all of the later blocks and the head; with per-layer
  updates none, but the step of the block's largest parameter: its gradient and step workspace);
* per-layer updates: ``step output.weight`` (all activations but the log-softmax, its gradient and
  workspace) and ``step <first parameter>`` (the embedding, stepped last: nothing else alive);
* ``step`` (without per-layer updates): every gradient plus the largest group's step workspace.

Step workspace (what a rule's step allocates and frees; measured op by op with MemTracker):
* a rule that steps its group with one torch ``foreach`` call (the default ``adamw`` rule: torch's
  multi-tensor Adam) holds one temporary the size of the whole group (``exp_avg_sq.sqrt()``);
  ``fused``: none; every other rule loops over its parameters and holds two temporaries the size
  of one parameter (the full-size update and one product), or declares ``step_temporaries(specs)``
  (elements) itself;
* with ``state_8bit``, the composed optimizer decodes every quantized moment of the group before
  the rule runs (``bytes_per_element`` each, kept through the step) and encodes them one at a time
  after it; ``slimtrain.registry.quant8`` works through a moment ``CHUNK_ELEMENTS`` (4M) at a time, whole rows,
  and holds the new uint8 codes (1n) and fp32 scales, plus one chunk's temporaries of c elements:
  the normalized fp32 blocks, their absolute values, the uint8 codes, the int64 lower codes and the
  gathered midpoints (21c), the fp32 copy being encoded (``sqrt(v)`` for second moments, or the fp32
  copy of a non-fp32 moment: 4c) and, for rows padded to whole blocks, the padded blocks (4P, and
  21 bytes per padded element); decoding holds the int64 code indices and the gathered values of a
  chunk (12c). The workspace is the decoded moments plus the larger of the codec's transient and
  the rule's temporaries.

Not modelled (each below 2% at the measured sizes, or outside the issue's compositions): SLTrain's
backward rebuilding its dense weight and that weight's gradient (two m x n transients, one layer at
a time); the dense weight that ``torch.nn.utils.parametrize`` layers (low_rank, lora, relora) hand to
``F.linear``, which saves it for backward; GaLore's projection refresh every ``update_proj_gap``
steps; the RoPE table and the token ids; FSDP2 mixed precision's fp32 sharded parameters next to
their bf16 copies (the paper's convention: every tensor at ``bytes_per_element``). On CUDA the loss
is assumed to be the fp32 log-softmax of a cast copy, as on CPU (not measured on a GPU here).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from slimtrain.registry.method import ParamSpec

AC_MODES = ("none", "selective", "full")
DEVICES = ("cuda", "cpu")
STATE_8BIT = "state_8bit"
PER_LAYER = "per_layer_updates"
DEFAULT_OPTIMIZER = "adamw"
OUTPUT = "output.weight"
EMBEDDING = "tok_embeddings.weight"
#: bytes per element of one chunk ``slimtrain.registry.quant8`` holds while encoding (module docstring)
ENCODE_BYTES = 21
ENCODE_COPY_BYTES = 4
#: ... and while decoding: the int64 code indices and the gathered fp32 values
DECODE_BYTES = 12
#: log-softmax of the loss: its saved output, the incoming and the outgoing gradient (fp32)
LOSS_LOGIT_COPIES = 3


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    weights: int
    gradients: int
    optimizer: int
    index: int
    activations: int
    peak: int = 0
    peak_phase: str = ""
    #: bytes alive beyond weights + index + optimizer state at each modelled moment (``peak_phases``)
    phases: dict[str, int] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def static(self) -> int:
        """Weights + gradients + optimizer state + index buffers (no activations)."""
        return self.weights + self.gradients + self.optimizer + self.index

    @property
    def total(self) -> int:
        """The categories summed: not the peak (transients come and go; see ``peak``)."""
        return self.static + self.activations


def _block_size(composition) -> int | None:
    if STATE_8BIT not in composition.method_names:
        return None
    return int(composition.method(STATE_8BIT).config.block_size)


def _rules(composition, specs: Iterable[ParamSpec]) -> list[tuple[object, list[ParamSpec]]]:
    """(rule, its trainable parameters) per optimizer method, in the composition's order."""
    out: dict[str, tuple[object, list[ParamSpec]]] = {}
    for spec in specs:
        if not spec.trainable:
            continue
        owner = composition.owner_of(spec)
        if owner.name not in out:
            out[owner.name] = (owner.update_rule(), [])
        out[owner.name][1].append(spec)
    return list(out.values())


def _quantized(decl, block: int | None) -> bool:
    return block is not None and decl.moment and len(decl.shape) >= 2


def _state_bytes(decl, block: int | None, bytes_per_element: int) -> int:
    if not decl.shape:
        return 0  # scalars: bookkeeping (the paper's model does not count them)
    if _quantized(decl, block):
        rows = decl.numel // decl.shape[-1]
        return decl.numel + 4 * rows * math.ceil(decl.shape[-1] / block)
    return decl.numel * bytes_per_element


def optimizer_state_bytes(composition, specs: Iterable[ParamSpec], *, bytes_per_element: int = 2) -> int:
    """Declared state of every trainable parameter's own rule, 8-bit where ``state_8bit`` stores it."""
    block = _block_size(composition)
    return sum(
        _state_bytes(decl, block, bytes_per_element)
        for rule, group in _rules(composition, specs) for spec in group for decl in rule.state_specs(spec)
    )


def gradient_bytes(composition, specs: Iterable[ParamSpec], *, bytes_per_element: int = 2) -> int:
    trainable = [s.numel for s in specs if s.trainable]
    if not trainable:
        return 0
    if PER_LAYER in composition.method_names:
        return max(trainable) * bytes_per_element
    return sum(trainable) * bytes_per_element


def _rule_temporaries(rule, group: list[ParamSpec]) -> int:
    """Elements of the temporaries ``rule`` allocates stepping ``group`` at once (module docstring)."""
    declared = getattr(rule, "step_temporaries", None)
    if declared is not None:
        return int(declared(group))
    implementation = getattr(rule, "implementation", "foreach")
    if getattr(rule, "method", "") == DEFAULT_OPTIMIZER:
        if implementation == "fused":
            return 0
        if implementation == "foreach":
            return sum(s.numel for s in group)
        return max(s.numel for s in group)
    return 2 * max(s.numel for s in group)


def codec_transient_bytes(decl, block: int, bytes_per_element: int) -> int:
    """Bytes ``slimtrain.registry.quant8`` holds at once encoding or decoding one moment (module docstring).
    It works ``CHUNK_ELEMENTS`` at a time (whole rows), so beyond the new codes and scales only one
    chunk's temporaries are alive; rows are zero-padded to whole blocks, so a moment whose last
    dimension is much smaller than the block (APOLLO-Mini's m x 1 moments) costs its padded size."""
    from slimtrain.registry.quant8 import CHUNK_ELEMENTS, n_blocks

    n, last = decl.numel, decl.shape[-1]
    rows = n // last
    chunk_rows = min(rows, max(1, CHUNK_ELEMENTS // last))
    c = chunk_rows * last
    cp = chunk_rows * n_blocks(last, block) * block  # the chunk's elements, padded to whole blocks
    unsigned = decl.name.endswith("exp_avg_sq") or decl.name in ("v", "second_moment")
    copy = ENCODE_COPY_BYTES * c if (unsigned or bytes_per_element != 4) else 0  # sqrt(v) or fp32 copy
    padded = 4 * cp if cp > c else 0  # the zero-padded fp32 blocks
    scales = 4 * rows * n_blocks(last, block)
    encode = n + scales + copy + padded + ENCODE_BYTES * cp
    decode = max(DECODE_BYTES * c, 4 * c + padded)  # int64 indices and gathered values; or values and padded blocks
    return max(encode, decode)


def step_workspace_bytes(rule, group: list[ParamSpec], *, block: int | None, bytes_per_element: int) -> int:
    """Bytes one step of ``rule`` over ``group`` (stepped at once) allocates and frees."""
    temporaries = _rule_temporaries(rule, group) * bytes_per_element
    decoded, codec = 0, 0
    for spec in group:
        for decl in rule.state_specs(spec):
            if _quantized(decl, block):
                decoded += decl.numel * bytes_per_element
                codec = max(codec, codec_transient_bytes(decl, block, bytes_per_element))
    return decoded + max(temporaries, codec)


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None


@dataclasses.dataclass(frozen=True)
class _Shape:
    dim: int
    ffn: int
    layers: int
    heads: int
    vocab: int
    tokens: int
    kv: int
    act_bytes: int
    device: str

    @property
    def norm(self) -> int:
        """One RMSNorm's saved tensors (input counted by its producer): output (+ x*rstd on CPU), rstd."""
        kept = 2 if self.device == "cpu" else 1
        return self.tokens * (kept * self.dim * self.act_bytes + 4)

    @property
    def block_input(self) -> int:
        return self.tokens * self.dim * self.act_bytes

    @property
    def block(self) -> int:
        """Everything one block saves for backward, its input included."""
        d, t, a = self.dim, self.tokens, self.act_bytes
        attention = t * ((d + 2 * self.kv + d) * a + 4 * self.heads)  # q, k, v, SDPA out, log-sum-exp
        ffn = t * 4 * self.ffn * a
        residual = t * d * a
        return self.block_input + 2 * self.norm + attention + residual + ffn

    @property
    def head(self) -> int:
        # the final norm's input (the last block's output, which no block keeps), its own tensors,
        # and the fp32 log-softmax
        return self.block_input + self.norm + self.tokens * self.vocab * 4

    @property
    def swiglu_backward(self) -> int:
        return self.tokens * (self.dim + 2 * self.ffn) * self.act_bytes

    def checkpointed(self, ac: str) -> list[bool]:
        if ac == "full":
            return [True] * self.layers
        if ac == "selective":
            return [(i + 1) % 2 == 0 for i in range(self.layers)]
        return [False] * self.layers

    def kept(self, ac: str) -> list[int]:
        """What each block keeps from forward to backward."""
        return [self.block_input if c else self.block for c in self.checkpointed(ac)]


def _shape(dim, ffn, layers, heads, vocab, batch, seq_len, kv_heads, act_bytes, device) -> _Shape:
    if device not in DEVICES:
        raise ValueError(f"device = {device!r}; allowed: {', '.join(DEVICES)}")
    return _Shape(dim, ffn, layers, heads, vocab, batch * seq_len, dim // heads * (kv_heads or heads), act_bytes, device)


def activation_bytes(
    *, dim: int, ffn: int, layers: int, heads: int, vocab: int, batch: int, seq_len: int, ac: str = "none",
    kv_heads: int | None = None, act_bytes: int = 2, device: str = "cuda",
) -> int:
    """Activations saved for backward at the end of the forward and loss (module docstring)."""
    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing = {ac!r}; allowed: {', '.join(AC_MODES)}")
    s = _shape(dim, ffn, layers, heads, vocab, batch, seq_len, kv_heads, act_bytes, device)
    return sum(s.kept(ac)) + s.head


def peak_phases(composition, specs: list[ParamSpec], s: _Shape, ac: str, *, bytes_per_element: int) -> dict[str, int]:
    """Bytes alive beyond the static memory at each modelled moment of one step (module docstring)."""
    bpe = bytes_per_element
    block = _block_size(composition)
    per_layer = PER_LAYER in composition.method_names
    rules = _rules(composition, specs)
    kept = s.kept(ac)
    ckpt = s.checkpointed(ac)
    activations = sum(kept) + s.head
    logits = s.tokens * s.vocab * 4
    phases = {"loss": activations + (LOSS_LOGIT_COPIES - 1) * logits}

    grads_by_block: dict[int | None, int] = {}
    for spec in specs:
        if spec.trainable:
            b = _block_of(spec.name)
            grads_by_block[b] = grads_by_block.get(b, 0) + spec.numel * bpe
    alone: dict[str, int] = {}  # per-layer: one parameter's gradient + its step workspace
    if per_layer:
        for rule, group in rules:
            for spec in group:
                alone[spec.name] = spec.numel * bpe + step_workspace_bytes(rule, [spec], block=block, bytes_per_element=bpe)

    remaining = sum(kept)  # block activations alive when backward reaches block i
    grads = 0  # without per-layer updates: gradients produced before block i's backward
    for name in (OUTPUT, "norm.weight"):
        spec = next((x for x in specs if x.name == name and x.trainable), None)
        if spec is not None:
            grads += spec.numel * bpe
    for i in reversed(range(s.layers)):
        recompute = s.block - s.block_input if ckpt[i] else 0
        inner = remaining + recompute + s.swiglu_backward
        if per_layer:
            in_block = [v for n, v in alone.items() if _block_of(n) == i]
            phases[f"block {i}"] = inner + (max(in_block) if in_block else 0)
        else:
            phases[f"block {i}"] = inner + grads
            grads += grads_by_block.get(i, 0)
        remaining -= kept[i]
    if per_layer:
        if OUTPUT in alone:
            phases[f"step {OUTPUT}"] = activations - logits + alone[OUTPUT]
        if EMBEDDING in alone:
            phases[f"step {EMBEDDING}"] = alone[EMBEDDING]
    else:
        phases["step"] = gradient_bytes(composition, specs, bytes_per_element=bpe) + max(
            (step_workspace_bytes(rule, group, block=block, bytes_per_element=bpe) for rule, group in rules), default=0
        )
    return phases


def device_memory(
    composition, dense: Iterable[ParamSpec], *, dim: int, ffn: int, layers: int, heads: int, vocab: int,
    batch: int, seq_len: int, ac: str = "none", bytes_per_element: int = 2, act_bytes: int | None = None,
    kv_heads: int | None = None, device: str = "cuda",
) -> DeviceMemory:
    from slimtrain.registry.memory import transformed_specs

    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing = {ac!r}; allowed: {', '.join(AC_MODES)}")
    specs, extra = transformed_specs(composition, dense)
    act = act_bytes or bytes_per_element
    s = _shape(dim, ffn, layers, heads, vocab, batch, seq_len, kv_heads, act, device)
    weights = sum(x.numel for x in specs) * bytes_per_element
    optimizer = optimizer_state_bytes(composition, specs, bytes_per_element=bytes_per_element)
    phases = peak_phases(composition, specs, s, ac, bytes_per_element=bytes_per_element)
    phase = max(phases, key=phases.get)
    return DeviceMemory(
        weights=weights,
        gradients=gradient_bytes(composition, specs, bytes_per_element=bytes_per_element),
        optimizer=optimizer,
        index=extra,
        activations=sum(s.kept(ac)) + s.head,
        peak=weights + extra + optimizer + phases[phase],
        peak_phase=phase,
        phases=phases,
    )
