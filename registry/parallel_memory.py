"""What ONE rank holds under FSDP2 / HSDP / tensor parallelism: ``registry/device_memory.py``'s
one-device model, divided the way the degrees divide each category.

Why a separate module: the one-device model counts whole tensors at one batch; a rank of a 2-D mesh
holds a shard of the weights, gradients and state, a slice of the batch, and (under TP) a slice of
every activation. The division, per category (``dp_shard``, ``dp_replicate``, ``tp``: torchtitan's
``data_parallel_shard_degree``, ``data_parallel_replicate_degree``, ``tensor_parallel_degree``):

* weights, gradients, optimizer state, index buffers: every 2-D parameter's share is divided by
  ``dp_shard x tp`` (FSDP2 shards it over the shard group, the TP plan splits every Linear and the
  embedding / output head over TP ranks), every 1-D parameter's (norms) by ``dp_shard`` (TP
  replicates norms). Gradients follow their parameter's division (the weights' fraction per rank);
  optimizer state follows each declaration's ``StateSpec.layout``: ``rows`` state is divided like
  its parameter (under TP only for rules elementwise on any shard, ``UpdateRule.any_placement``;
  the others keep it in the row view's layout, divided by ``dp_shard`` only; the row view's
  transient copies of a parameter and its gradient during the step are not counted), ``replicate`` state (GaLore's projection and left-side moments, APOLLO's
  projections) is whole on every rank. ``dp_replicate`` divides none of these: each replica group
  holds a whole sharded copy;
* activations: computed by the one-device model at the LOCAL batch, ``batch / (dp_shard x
  dp_replicate)`` sequences (``batch`` is the global batch: it must divide), then divided by ``tp``
  (column-/row-wise Linears split heads and FFN width, sequence-parallel norms split the sequence,
  loss-parallel splits the logits by vocabulary);
* FSDP2's own buffers when ``dp_shard > 1``: the unsharded parameters of the block being computed
  and of the prefetched next one, and one block's unsharded gradients before their reduce-scatter:
  3 x the largest block's weights / ``tp``;
* the peak: the per-rank weights + index + optimizer state + FSDP buffers + the largest of the
  one-device model's phases (``DeviceMemory.phases``, at the local batch), each divided as what
  dominates it: the optimizer-step phases (gradients + a rule's workspace, all parameter-shaped)
  by the weights' per-rank fraction, the loss and backward phases (activations, logits, the
  gradients produced so far) by ``tp`` only. The gradients inside a backward phase are really
  divided by ``dp_shard x tp``, so this is an upper estimate; not validated against a multi-GPU run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from slimtrain.registry.device_memory import DeviceMemory, _block_of, _rules, _state_bytes, device_memory
from slimtrain.registry.errors import ConfigError
from slimtrain.registry.method import ParamSpec


@dataclasses.dataclass(frozen=True)
class Degrees:
    dp_shard: int = 1
    dp_replicate: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for key, value in dataclasses.asdict(self).items():
            if int(value) < 1:
                raise ConfigError(f"{key} = {value}: a parallel degree is an integer >= 1")

    @property
    def data_parallel(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def world(self) -> int:
        return self.data_parallel * self.tp


@dataclasses.dataclass(frozen=True)
class RankMemory:
    """One rank's bytes (see the module docstring for each division)."""

    degrees: Degrees
    local_batch: int
    weights: int
    gradients: int
    optimizer: int
    index: int
    activations: int
    fsdp_buffers: int
    peak: int
    whole: DeviceMemory  # the one-device model at the local batch, undivided

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.index

    @property
    def total(self) -> int:
        return self.static + self.activations + self.fsdp_buffers


def rank_memory(
    composition, dense: Iterable[ParamSpec], *, degrees: Degrees, batch: int, **model_kwargs,
) -> RankMemory:
    """``device_memory(composition, dense, batch=batch / data-parallel ranks, **model_kwargs)``
    divided per rank. ``batch`` is the global batch in sequences; raises ConfigError when the
    data-parallel degrees do not divide it."""
    from slimtrain.registry.memory import transformed_specs

    dense = list(dense)
    d = degrees
    if batch % d.data_parallel:
        raise ConfigError(
            f"batch = {batch} sequences is not divisible by dp_shard x dp_replicate = {d.dp_shard} x "
            f"{d.dp_replicate} = {d.data_parallel} (each data-parallel rank reads batch / {d.data_parallel})"
        )
    local = batch // d.data_parallel
    whole = device_memory(composition, dense, batch=local, **model_kwargs)
    specs, _ = transformed_specs(composition, dense)
    matrix = sum(s.numel for s in specs if len(s.shape) >= 2)
    vector = sum(s.numel for s in specs if len(s.shape) < 2)
    held = matrix / (d.dp_shard * d.tp) + vector / d.dp_shard
    fraction = held / max(matrix + vector, 1)  # of every parameter-shaped category
    bpe = whole.weights / max(matrix + vector, 1)  # bytes per weight element of the model
    blocks: dict[int, int] = {}
    for s in specs:
        b = _block_of(s.name)
        if b is not None:
            blocks[b] = blocks.get(b, 0) + s.numel
    block_weights = max(blocks.values(), default=0) * bpe
    fsdp = int(3 * block_weights / d.tp) if d.dp_shard > 1 else 0
    weights = int(whole.weights * fraction)
    gradients = int(whole.gradients * fraction)
    optimizer = rank_optimizer_bytes(composition, specs, degrees, model_kwargs.get("bytes_per_element", 2))
    index = int(whole.index / (d.dp_shard * d.tp))
    activations = int(whole.activations / d.tp)
    phases = {name: (b * fraction if name.startswith("step") else b / d.tp) for name, b in whole.phases.items()}
    peak = weights + optimizer + index + fsdp + int(max(phases.values(), default=0))
    if d.world == 1:
        peak = whole.peak  # one device: the phase model itself
    return RankMemory(d, local, weights, gradients, optimizer, index, activations, fsdp, peak, whole)


def rank_optimizer_bytes(composition, specs: list[ParamSpec], degrees: Degrees, bytes_per_element: int) -> int:
    """Each rule's declared state on one rank: ``rows`` state divided like its parameter (2-D by
    dp_shard x tp for an any_placement rule, else by dp_shard; 1-D by dp_shard), ``replicate`` state whole."""
    codec = composition.state_codec()  # the memory layer's own bytes (StateCodec.stored_bytes)
    total = 0.0
    for rule, group in _rules(composition, specs):
        for spec in group:
            for decl in rule.state_specs(spec):
                b = _state_bytes(decl, codec, bytes_per_element)
                if decl.layout == "rows":
                    # a rule that is not elementwise on any shard keeps a TP weight's rows state in
                    # the row view's layout (slimtrain.registry.sharded.row_view): divided by dp_shard only
                    tp_divides = len(decl.shape) >= 2 and getattr(rule, "any_placement", False)
                    b /= degrees.dp_shard * (degrees.tp if tp_divides else 1)
                total += b
    master = composition.master_weights()  # a master-weights layer's state: placed like its parameter
    for _, group in _rules(composition, specs) if master is not None else ():
        for spec in group:
            total += master.stored_bytes(spec) / (degrees.dp_shard * (degrees.tp if len(spec.shape) >= 2 else 1))
    return int(total)
