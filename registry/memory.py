"""Analytic memory of a composition: weights, optimizer state and extra buffers.

The model is the benchmark paper's: every weight and every optimizer-state element costs
``bytes_per_element`` (2 for bf16), frozen weights included; extra buffers such as SLTrain's int64
support index are counted separately. Each parametrizing method says which parameters replace a
dense weight (``param_specs``) and what buffers it adds (``extra_bytes``); each parameter's optimizer
state is what its OWN update rule declares for it (``UpdateRule.state_specs``), so two optimizer
methods are each counted on their own parameters. The same hooks serve the
``slimtrain memory`` table and the tests that check them against real (meta-device) models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from slimtrain.registry.method import Capability, ParamSpec
from slimtrain.registry.targets import matches_any


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    weight_params: int  # every parameter, frozen ones included
    trainable_params: int
    optimizer_state_elements: int
    extra_bytes: int
    bytes_per_element: int = 2
    #: when a state codec stores some state its own way: the state's bytes, as the codec stores them
    stored_optimizer_bytes: int | None = None

    @property
    def weights_bytes(self) -> int:
        return self.weight_params * self.bytes_per_element

    @property
    def optimizer_bytes(self) -> int:
        if self.stored_optimizer_bytes is not None:
            return self.stored_optimizer_bytes
        return self.optimizer_state_elements * self.bytes_per_element

    @property
    def total_bytes(self) -> int:
        """Weights plus optimizer state (the paper's figure), without extra buffers."""
        return self.weights_bytes + self.optimizer_bytes


def transformed_specs(composition, dense: Iterable[ParamSpec]) -> tuple[list[ParamSpec], int]:
    """Replace each targeted dense Linear weight by its method's parameters; also sum extra bytes."""
    parametrizers = composition.with_capability(Capability.PARAMETRIZATION)
    out: list[ParamSpec] = []
    extra = 0
    for spec in dense:
        owner = None
        if spec.is_linear and spec.role == "weight" and len(spec.shape) == 2:
            owner = next((m for m in parametrizers if matches_any(spec.module, m.target_patterns())), None)
        if owner is None:
            out.append(spec)
            continue
        shape = (spec.shape[0], spec.shape[1])
        out.extend(owner.param_specs(spec.module, shape))
        extra += owner.extra_bytes(spec.module, shape)
    return out, extra


def estimate_memory(composition, dense: Iterable[ParamSpec], *, bytes_per_element: int = 2) -> MemoryEstimate:
    specs, extra = transformed_specs(composition, dense)
    return MemoryEstimate(
        weight_params=sum(s.numel for s in specs),
        trainable_params=sum(s.numel for s in specs if s.trainable),
        optimizer_state_elements=optimizer_state_elements(composition, specs),
        extra_bytes=extra,
        bytes_per_element=bytes_per_element,
        stored_optimizer_bytes=_stored_state_bytes(composition, specs, bytes_per_element),
    )


def _stored_state_bytes(composition, specs: list[ParamSpec], bytes_per_element: int) -> int | None:
    """With a state codec (``Capability.STATE_CODEC``) the declarations it serves cost its own
    ``stored_bytes``, and a master-weights layer (``Capability.MASTER_WEIGHTS``) adds its own state per
    trainable parameter (``MasterWeights.stored_bytes``: the correction of compressed master weights):
    the same count as ``slimtrain memory --device`` (slimtrain.registry.device_memory), so both tables agree."""
    from slimtrain.registry.device_memory import optimizer_state_bytes

    if composition.codec_method is None and composition.master_method is None:
        return None
    return optimizer_state_bytes(composition, specs, bytes_per_element=bytes_per_element)


def optimizer_state_elements(composition, specs: Iterable[ParamSpec]) -> int:
    """Sum over trainable parameters of the state their own rule declares (the routing plan)."""
    plan = composition.routing(specs)
    return sum(plan.rule_of(spec).state_elements(spec) for spec in plan.specs)


def llama_dense_specs(dim: int, ffn: int, layers: int, vocab: int, heads: int, kv_heads: int | None = None) -> list[ParamSpec]:
    """Parameters of a dense LLaMA decoder, named as torchtitan names them (no torchtitan needed)."""
    kv_dim = dim // heads * (kv_heads or heads)
    specs = [ParamSpec("tok_embeddings.weight", "tok_embeddings", "weight", (vocab, dim))]
    for i in range(layers):
        p = f"layers.{i}"
        for name, shape, block in (
            ("wq", (dim, dim), "attention"),
            ("wk", (kv_dim, dim), "attention"),
            ("wv", (kv_dim, dim), "attention"),
            ("wo", (dim, dim), "attention"),
            ("w1", (ffn, dim), "feed_forward"),
            ("w2", (dim, ffn), "feed_forward"),
            ("w3", (ffn, dim), "feed_forward"),
        ):
            module = f"{p}.{block}.{name}"
            specs.append(ParamSpec(f"{module}.weight", module, "weight", shape, is_linear=True))
        for norm in ("attention_norm", "ffn_norm"):
            specs.append(ParamSpec(f"{p}.{norm}.weight", f"{p}.{norm}", "weight", (dim,)))
    specs.append(ParamSpec("norm.weight", "norm", "weight", (dim,)))
    specs.append(ParamSpec("output.weight", "output", "weight", (vocab, dim), is_linear=True))
    return specs


def training_flops_per_token(composition, dense: Iterable[ParamSpec], *, n_layers: int, dim: int, seq_len: int) -> float:
    """Approximate training FLOPs per token: 6 x matmul MACs (forward + backward) plus causal
    attention's 12 * layers * dim * seq_len (as torchtitan counts it); embeddings excluded."""
    parametrizers = composition.with_capability(Capability.PARAMETRIZATION)
    macs = 0
    for spec in dense:
        if not (spec.is_linear and spec.role == "weight" and len(spec.shape) == 2):
            continue
        shape = (spec.shape[0], spec.shape[1])
        owner = next((m for m in parametrizers if matches_any(spec.module, m.target_patterns())), None)
        macs += owner.macs_per_token(spec.module, shape) if owner else spec.numel
    return 6.0 * macs + 12.0 * n_layers * dim * seq_len
