"""What a device holds while training one composition: weights, gradients, optimizer state, index
buffers, activations, and the PEAK of one training step (the paper's table counts only weights and
optimizer state). Validated against torch's MemTracker on CPU (benchmarks/memory_tracker.py,
tests/methods/test_memory_tracker.py, docs/benchmarks/memory_model_vs_memtracker.md).

Conventions (the paper's, extended):
* every weight, gradient and full-precision state element costs ``bytes_per_element`` (2, bf16);
  SLTrain's int64 support index and other buffers are the methods' own ``extra_bytes``;
* optimizer state is what each parameter's own update rule declares (the composition's routing
  plan); with a state codec (a ``Capability.STATE_CODEC`` method, e.g. 8-bit state) every
  declaration it ``serves`` costs the codec's own ``stored_bytes``, the rest full precision; a
  master-weights layer (``Capability.MASTER_WEIGHTS``, e.g. bf16 + 8-bit correction) adds its own
  ``stored_bytes`` per trainable parameter (the correction) to the optimizer state; the weights stay at
  ``bytes_per_element`` (the paper counts bf16 weights and no fp32 master copy);
* gradients: one per trainable element, or with a stepper that steps in backward
  (``Method.steps_in_backward``, e.g. per-layer updates) only the largest trainable parameter's
  (each gradient is freed by its update before the next is produced). With gradient accumulation
  (``grad_accumulation_steps > 1``) every parameter's gradient is an accumulation buffer alive
  between micro-batches; with such a stepper, a parameter whose rule declares its own buffers
  (``UpdateRule.accumulation_specs``: a projected rule's r x n ``P^T G``) costs those buffers instead
  (their declared dtype: fp32), plus one arriving micro-batch gradient at a time (folded into the
  buffers and freed, or added to a kept gradient: the largest parameter's, in ``gradients``; in a
  block's backward, the block's largest projected parameter's gradient and step workspace).

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
  with accumulation, plus the accumulation buffers (alive from the second micro-batch on);
* ``block i``: backward through block i (last first): the activations not yet freed, block i's
  recomputed set (when checkpointed, less its saved input), the SwiGLU's backward temporaries
  (the incoming h-gradient and three f-sized gradients, less the product already freed: h + 2f),
  and the gradients produced so far (all of the later blocks and the head; with per-layer
  updates none, but the step of the block's largest parameter: its gradient and step workspace);
* per-layer updates: ``step output.weight`` (all activations but the log-softmax, its gradient and
  workspace) and ``step <first parameter>`` (the embedding, stepped last: nothing else alive);
* ``step`` (without per-layer updates): every gradient plus the largest group's step workspace.

Step workspace (what a rule's step allocates and frees; measured op by op with MemTracker):
* a rule declares ``step_temporaries(specs)`` (elements it allocates stepping ``specs`` at once;
  the default AdamW rule: one group-sized temporary with ``foreach``, none ``fused``); a rule that
  does not loops over its parameters and holds two temporaries the size of one parameter (the
  full-size update and one product);
* with a state codec, the composed optimizer decodes, steps and re-encodes ONE parameter at a time
  whose state it serves (parameters with no served state are stepped together): the workspace is
  the largest of the batch's temporaries and, per coded parameter, its decoded state
  (``bytes_per_element`` each) plus the larger of the codec's ``coding_bytes`` and the rule's
  temporaries for that parameter.

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
OUTPUT = "output.weight"
EMBEDDING = "tok_embeddings.weight"
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


def _rules(composition, specs: Iterable[ParamSpec]) -> list[tuple[object, list[ParamSpec]]]:
    """(rule, its trainable parameters) per optimizer method: the composition's routing plan."""
    return composition.routing(specs).by_rule()


def _state_bytes(decl, codec, bytes_per_element: int) -> int:
    if not decl.shape:
        return 0  # scalars: bookkeeping (the paper's model does not count them)
    if codec is not None and codec.serves(decl):
        return codec.stored_bytes(decl, bytes_per_element)
    return decl.numel * bytes_per_element


def optimizer_state_bytes(composition, specs: Iterable[ParamSpec], *, bytes_per_element: int = 2) -> int:
    """Declared state of every trainable parameter's own rule, as the state codec (if any) stores it,
    plus a master-weights layer's own state per trainable parameter."""
    codec = composition.state_codec()
    master = composition.master_weights()
    return sum(
        _state_bytes(decl, codec, bytes_per_element)
        for rule, group in _rules(composition, specs) for spec in group for decl in rule.state_specs(spec)
    ) + sum(master.stored_bytes(spec) for _, group in _rules(composition, specs) for spec in group if master)


def _buffer_bytes(decls, bytes_per_element: int) -> int:
    """Bytes of declared accumulation buffers: each in its declared dtype (or the parameter's)."""
    return sum(d.numel * (d.dtype.itemsize if d.dtype is not None else bytes_per_element) for d in decls)


def accumulation_buffers(composition, specs: Iterable[ParamSpec], *, bytes_per_element: int = 2) -> dict[str, int | None]:
    """Per trainable parameter (by name), with a stepper that steps in backward and accumulation: the
    bytes of the buffers its rule accumulates into (``UpdateRule.accumulation_specs``), or None
    where the rule accumulates the full gradient."""
    out: dict[str, int | None] = {}
    for rule, group in _rules(composition, specs):
        for spec in group:
            decls = rule.accumulation_specs(spec)
            out[spec.name] = None if decls is None else _buffer_bytes(decls, bytes_per_element)
    return out


def gradient_bytes(
    composition, specs: Iterable[ParamSpec], *, bytes_per_element: int = 2, grad_accumulation_steps: int = 1,
) -> int:
    """Gradients alive at once: all of them, or the largest one when a stepper steps in backward
    without accumulation. With accumulation every gradient is a buffer kept between micro-batches,
    except, with such a stepper, those whose rule keeps its own buffers (counted instead, plus the
    largest such parameter's micro-batch gradient)."""
    specs = list(specs)
    trainable = [s.numel for s in specs if s.trainable]
    if not trainable:
        return 0
    if composition.steps_in_backward and grad_accumulation_steps <= 1:
        return max(trainable) * bytes_per_element
    if not composition.steps_in_backward:
        return sum(trainable) * bytes_per_element
    buffers = accumulation_buffers(composition, specs, bytes_per_element=bytes_per_element)
    numel = {s.name: s.numel for s in specs}
    kept = sum(numel[n] * bytes_per_element if b is None else b for n, b in buffers.items())
    # one micro-batch gradient arriving at a time: folded into a rule's buffers, or added to the
    # kept gradient (both alive at that moment): the largest parameter's
    return kept + max(trainable) * bytes_per_element


def _rule_temporaries(rule, group: list[ParamSpec]) -> int:
    """Elements of the temporaries ``rule`` allocates stepping ``group`` at once (module docstring)."""
    declared = getattr(rule, "step_temporaries", None)
    if declared is not None:
        return int(declared(group))
    return 2 * max(s.numel for s in group)


def step_workspace_bytes(rule, group: list[ParamSpec], *, codec, bytes_per_element: int, master=None) -> int:
    """Bytes one step of ``rule`` over ``group`` allocates and frees: the parameters without coded
    state stepped together, each one with coded state on its own (module docstring); with a
    master-weights layer every parameter on its own, plus the layer's ``coding_bytes`` (its master
    copy, the cast gradient and the split's temporaries)."""
    bpe = bytes_per_element
    together, most = [], 0
    if master is not None:
        for spec in group:
            coded = [d for d in rule.state_specs(spec) if codec is not None and codec.serves(d)]
            decoded = sum(d.numel for d in coded) * bpe
            coding = max((codec.coding_bytes(d, bpe) for d in coded), default=0)
            most = max(most, decoded + max(_rule_temporaries(rule, [spec]) * bpe, coding) + master.coding_bytes(spec))
        return most
    for spec in group:
        coded = [d for d in rule.state_specs(spec) if codec is not None and codec.serves(d)]
        if not coded:
            together.append(spec)
            continue
        decoded = sum(d.numel for d in coded) * bpe
        coding = max(codec.coding_bytes(d, bpe) for d in coded)
        most = max(most, decoded + max(_rule_temporaries(rule, [spec]) * bpe, coding))
    if together:
        most = max(most, _rule_temporaries(rule, together) * bpe)
    return most


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


def peak_phases(
    composition, specs: list[ParamSpec], s: _Shape, ac: str, *, bytes_per_element: int, grad_accumulation_steps: int = 1,
) -> dict[str, int]:
    """Bytes alive beyond the static memory at each modelled moment of one step (module docstring).
    With accumulation, from the second micro-batch on every gradient (accumulation buffer) is alive
    through backward; a stepper that steps in backward frees each after the last micro-batch's step."""
    bpe = bytes_per_element
    codec = composition.state_codec()
    master = composition.master_weights()
    per_layer = composition.steps_in_backward
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
    workspace: dict[str, int] = {}  # ... its step workspace alone (its gradient already counted)
    if per_layer:
        for rule, group in rules:
            for spec in group:
                workspace[spec.name] = step_workspace_bytes(rule, [spec], codec=codec, bytes_per_element=bpe, master=master)
                alone[spec.name] = spec.numel * bpe + workspace[spec.name]

    accumulated = 0  # gradients kept between micro-batches (accumulation buffers), alive through backward
    projected: set[str] = set()  # per-layer: parameters whose rule keeps its own buffers (gradient transient)
    if grad_accumulation_steps > 1:
        if per_layer:
            buffers = accumulation_buffers(composition, specs, bytes_per_element=bpe)
            numel = {x.name: x.numel for x in specs}
            accumulated = sum(numel[n] * bpe if b is None else b for n, b in buffers.items())
            projected = {n for n, b in buffers.items() if b is not None}
        else:
            accumulated = gradient_bytes(composition, specs, bytes_per_element=bpe, grad_accumulation_steps=grad_accumulation_steps)
    phases["loss"] += accumulated  # from the second micro-batch on, the buffers are alive at the loss too
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
            # accumulating: a full gradient is in `accumulated`; a projected rule's is produced and freed
            in_block = [
                (alone if not accumulated or n in projected else workspace)[n] for n in alone if _block_of(n) == i
            ]
            phases[f"block {i}"] = inner + accumulated + (max(in_block) if in_block else 0)
        else:
            phases[f"block {i}"] = inner + max(grads, accumulated)
            grads += grads_by_block.get(i, 0)
        remaining -= kept[i]
    if per_layer:
        if OUTPUT in alone:
            own = (alone if not accumulated or OUTPUT in projected else workspace)[OUTPUT] + accumulated
            phases[f"step {OUTPUT}"] = activations - logits + own
        if EMBEDDING in alone:
            phases[f"step {EMBEDDING}"] = alone[EMBEDDING]
    else:
        phases["step"] = gradient_bytes(composition, specs, bytes_per_element=bpe) + max(
            (step_workspace_bytes(rule, group, codec=codec, bytes_per_element=bpe, master=master) for rule, group in rules),
            default=0
        )
    return phases


def device_memory(
    composition, dense: Iterable[ParamSpec], *, dim: int, ffn: int, layers: int, heads: int, vocab: int,
    batch: int, seq_len: int, ac: str = "none", bytes_per_element: int = 2, act_bytes: int | None = None,
    kv_heads: int | None = None, device: str = "cuda", grad_accumulation_steps: int = 1,
) -> DeviceMemory:
    """The memory of one step at ``batch`` sequences per micro-batch (``grad_accumulation_steps``
    micro-batches per step: activations are one micro-batch's, gradients accumulate)."""
    from slimtrain.registry.memory import transformed_specs

    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing = {ac!r}; allowed: {', '.join(AC_MODES)}")
    specs, extra = transformed_specs(composition, dense)
    act = act_bytes or bytes_per_element
    s = _shape(dim, ffn, layers, heads, vocab, batch, seq_len, kv_heads, act, device)
    weights = sum(x.numel for x in specs) * bytes_per_element
    optimizer = optimizer_state_bytes(composition, specs, bytes_per_element=bytes_per_element)
    phases = peak_phases(
        composition, specs, s, ac, bytes_per_element=bytes_per_element, grad_accumulation_steps=grad_accumulation_steps,
    )
    phase = max(phases, key=phases.get)
    return DeviceMemory(
        weights=weights,
        gradients=gradient_bytes(
            composition, specs, bytes_per_element=bytes_per_element, grad_accumulation_steps=grad_accumulation_steps,
        ),
        optimizer=optimizer,
        index=extra,
        activations=sum(s.kept(ac)) + s.head,
        peak=weights + extra + optimizer + phases[phase],
        peak_phase=phase,
        phases=phases,
    )
