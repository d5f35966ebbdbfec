"""Checks that need the model's shapes but not the model: run before anything is built.

Why: a rank that does not fit a layer (``--sltrain.rank 100000``, or 128 on the nano flavor's
32-wide layers) used to surface only when the converter parametrized the meta model or the
optimizer was built, after torch.distributed, the corpus and the model were set up (and the dump
folder written). The flavor's dense LLaMA shapes are known from its arguments alone, so every
per-layer check of every method runs here on ``ParamSpec``s: each parametrizing method builds its
parametrization of every targeted shape on the meta device (its own shape checks raise), every
optimizer method's update rule checks the parameters it would own (GaLore's rank), and every
param-group method sees the parameters it would select. The trainer also refuses run lengths that
would train nothing, and GPU-path settings this machine or slimtrain cannot do (accelerator_checks.py).
"""

from __future__ import annotations

from typing import Any

from slimtrain.registry import Capability, ConfigError, llama_dense_specs
from slimtrain.registry.memory import transformed_specs


def check_run_length(job_config: Any) -> None:
    steps = job_config.training.steps
    if steps <= 0:
        raise ConfigError(
            f"[training] steps = {steps}: a run needs at least one step; allowed: an integer >= 1 "
            f"(--training.steps N)"
        )


def check_shapes(composition, model_args: Any) -> None:
    """Every per-layer check of ``composition`` on the flavor's shapes (raises ConfigError naming
    the method, the layer and its shape)."""
    from slimtrain.titan_integration.flavors import ffn_hidden_dim

    a = model_args
    dense = llama_dense_specs(a.dim, ffn_hidden_dim(a), a.n_layers, a.vocab_size, a.n_heads, a.n_kv_heads)
    specs, _ = transformed_specs(composition, dense)  # make_parametrization on every targeted shape
    plan = composition.routing(specs)  # two optimizer methods on one parameter: an error
    selecting = {m.name for m in composition.optimizer_methods}
    for spec in plan.specs:
        if plan.owners[spec.name] in selecting:
            plan.rule_of(spec).check(spec)  # e.g. GaLore's rank against this matrix
        for method in composition.with_capability(Capability.PARAM_GROUPS):
            method.param_group_options(spec)
    check_codec_serves(composition, plan)


def check_codec_serves(composition, plan) -> None:
    """A state codec must serve some state of every optimizer method with a selection of its own
    (else it is a codec for a rule that declares no moment it can store)."""
    codec = composition.state_codec()
    if codec is None:
        return
    for rule, group in plan.by_rule():
        if rule.method in {m.name for m in composition.optimizer_methods} and not any(
            codec.serves(d) for spec in group for d in rule.state_specs(spec)
        ):
            raise ConfigError(
                f"[{composition.codec_method.name}] stores none of the state optimizer method {rule.method!r} "
                f"declares on this model (no declaration it serves, e.g. no moment=True state); drop one of them"
            )


def check_before_model(job_config: Any, composition, model_args: Any) -> None:
    from slimtrain.titan_integration import accelerator_checks

    check_run_length(job_config)
    accelerator_checks.check_config(job_config)  # AC mode/option, compile and bf16 support of this machine
    check_shapes(composition, model_args)
