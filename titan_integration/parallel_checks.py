"""Checks of the ``[parallelism]`` degrees against the world size, the flavor and the recipe, before
torch.distributed, the corpus or the model exist.

Why here and not in torchtitan: torchtitan's ``ParallelDims`` asserts the product of the degrees
only after the process group is up (an ``AssertionError`` per rank), tensor parallelism that does
not divide the heads fails deep inside the attention's ``view``, and a method or rule that cannot
run on the resulting 2-D mesh fails at its first step (or, for a parametrized Linear, with
torchtitan's ``KeyError: parameter name can't contain "."``). Each check below names the
``parallelism.<key>``, its value and what it must divide or multiply to.

What runs on which mesh (tested in tests/integration/test_parallel_meshes.py):

* HSDP (``data_parallel_replicate_degree`` x ``data_parallel_shard_degree``): every recipe. Rules
  see ``(Replicate(), Shard(0))`` parameters; ``slimtrain.registry.sharded.RowShards`` works inside
  the shard dimension's group, so whole-matrix math runs once per matrix per replica group.
* Tensor parallelism (torchtitan's Llama plan: column-wise wq/wk/wv/w1/w3 and the output head,
  row-wise wo/w2 and the embedding, sequence-parallel norms): parameters sharded on their rows AND
  (row-wise Linear) on their columns. Every update rule runs: elementwise ones
  (``UpdateRule.any_placement``: AdamW) on the TP shards, the others on the parameter's row view
  (``slimtrain.registry.sharded.row_view``: gathered over TP, FSDP2's rows kept). Parametrizing
  methods whose parametrizations declare ``tp_dims`` (``Method.tensor_parallel``: low_rank, lora)
  have their factors sharded by the plan (titan_integration/tensor_parallel.py); the others
  (SLTrain) are refused (``_TP_PARAMETRIZATION``).
* Pipeline parallelism with a parametrizing method: refused (the converter does not wrap PP's parts).
"""

from __future__ import annotations

import os
from typing import Any

from slimtrain.registry import Capability, ConfigError

DEGREE_KEYS = (
    "data_parallel_replicate_degree", "data_parallel_shard_degree", "context_parallel_degree",
    "tensor_parallel_degree", "pipeline_parallel_degree",
)

#: what a parametrizing method would need to run under tensor parallelism (the refusal says it)
_TP_PARAMETRIZATION = (
    "its parametrization declares no `tp_dims` (slimtrain.registry.parametrization.LinearParametrization: "
    "how each original follows the column- and row-wise plan; the factorized ones declare it: B with W's "
    "rows, A with its columns, a frozen base like W) and its forward would have to compute on DTensor "
    "originals. A sparse parametrization also needs its values and their flat row-major index split by TP "
    "block (indices local to each shard) and its fused autograd function made DTensor-aware"
)


def world_size() -> int:
    """The number of ranks torchrun starts (``WORLD_SIZE``; 1 under plain python)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def degrees(job_config: Any) -> dict[str, int]:
    p = job_config.parallelism
    return {key: int(getattr(p, key)) for key in DEGREE_KEYS}


def check_degrees(deg: dict[str, int], world: int) -> dict[str, int]:
    """The degrees with ``data_parallel_shard_degree = -1`` resolved; raise ConfigError when they do
    not multiply to ``world``."""
    for key, value in deg.items():
        if value < 1 and not (key == "data_parallel_shard_degree" and value == -1):
            allowed = "-1 (the rest of the world size) or an integer >= 1" if key == "data_parallel_shard_degree" else "an integer >= 1"
            raise ConfigError(f"parallelism.{key} = {value}: allowed: {allowed}")
    others = {k: v for k, v in deg.items() if k != "data_parallel_shard_degree"}
    product = 1
    for v in others.values():
        product *= v
    listed = " x ".join(f"parallelism.{k} ({v})" for k, v in others.items() if v != 1) or "the other degrees (1)"
    shard = deg["data_parallel_shard_degree"]
    if shard == -1:
        if world % product:
            raise ConfigError(
                f"{listed} = {product} does not divide the world size {world} (torchrun --nproc-per-node "
                f"x nodes): parallelism.data_parallel_shard_degree = -1 takes the rest, so the product of "
                f"the other degrees must divide {world}"
            )
        shard = world // product
    elif product * shard != world:
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree = {shard} x {listed} = {product * shard} but the "
            f"world size is {world} (torchrun --nproc-per-node x nodes): the degrees must multiply to "
            f"the world size (or set data_parallel_shard_degree = -1 for the rest)"
        )
    return {**deg, "data_parallel_shard_degree": shard}


def check_tensor_parallel(tp: int, model_args: Any, flavor: str, seq_len: int) -> None:
    """``tp`` must divide what torchtitan's Llama plan splits: heads, KV heads, FFN width, vocab
    (the embedding and the output head) and the sequence (sequence-parallel norms)."""
    if tp == 1:
        return
    from slimtrain.titan_integration.flavors import ffn_hidden_dim

    a = model_args
    split = {
        "n_heads": (a.n_heads, "attention heads are split over TP ranks"),
        "n_kv_heads": (a.n_kv_heads or a.n_heads, "key/value heads are split over TP ranks"),
        "ffn hidden size": (ffn_hidden_dim(a), "w1/w3 are column-wise, w2 row-wise"),
        "vocab_size": (a.vocab_size, "the embedding and the output head are split by vocabulary"),
        "training.seq_len": (seq_len, "sequence-parallel norms split the sequence"),
    }
    for what, (n, why) in split.items():
        if n % tp:
            divisors = [d for d in range(1, n + 1) if n % d == 0 and d <= 64]
            raise ConfigError(
                f"parallelism.tensor_parallel_degree = {tp} does not divide the {flavor} flavor's {what} = {n} "
                f"({why}); use a divisor of {n}: {', '.join(map(str, divisors))}"
            )


def check_composition(deg: dict[str, int], composition) -> None:
    """Methods and rules that cannot run on the mesh these degrees build."""
    tp, pp = deg["tensor_parallel_degree"], deg["pipeline_parallel_degree"]
    parametrizing = [m.name for m in composition.with_capability(Capability.PARAMETRIZATION)]
    if pp > 1 and parametrizing:
        raise ConfigError(
            f"parallelism.pipeline_parallel_degree = {pp} is not supported with a weight-parametrizing "
            f"method ({', '.join(parametrizing)}): the converter does not wrap pipeline stages; use 1"
        )
    if tp == 1:
        return
    unplanned = [m.name for m in composition.with_capability(Capability.PARAMETRIZATION)
                 if not getattr(m, "tensor_parallel", False)]
    if unplanned:
        raise ConfigError(
            f"tensor parallelism (parallelism.tensor_parallel_degree = {tp}) is not supported with the weight-parametrizing "
            f"method(s) {', '.join(unplanned)}: {_TP_PARAMETRIZATION}. Use "
            f"--parallelism.tensor_parallel_degree 1 (FSDP2/HSDP run every recipe)"
        )
    # every update rule runs: elementwise ones (any_placement) on the TP shards, the others on their
    # row view (slimtrain.registry.sharded.row_view: gathered over TP, FSDP2's rows kept)
    layers = (composition.codec_method, composition.stepper_method, composition.master_method)
    layer_methods = [m.name for m in layers if m is not None]
    if layer_methods:
        raise ConfigError(
            f"tensor parallelism (parallelism.tensor_parallel_degree = {tp}) is not supported with {', '.join(layer_methods)} yet: "
            f"memory layers (state codecs, steppers, master weights) are tested through training on FSDP2 and HSDP row shards only "
            f"(a state codec's step math is equal under TP at unit level, but its per-row blocks of a row-wise weight's "
            f"column shard and their checkpoints are not tested; steppers and master weights are untested under TP)"
        )


def check_before_model(job_config: Any, composition, model_args: Any, world: int | None = None) -> dict[str, int]:
    """Every check above; returns the resolved degrees."""
    deg = check_degrees(degrees(job_config), world_size() if world is None else world)
    check_tensor_parallel(deg["tensor_parallel_degree"], model_args, job_config.model.flavor,
                          job_config.training.seq_len)
    check_composition(deg, composition)
    from slimtrain.titan_integration import checkpoint_mesh

    checkpoint_mesh.check_data_position(
        job_config, deg["data_parallel_shard_degree"] * deg["data_parallel_replicate_degree"])
    return deg
