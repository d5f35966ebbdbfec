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

import math
import os
from typing import Any

from slimtrain.registry import Capability, ConfigError, llama_dense_specs
from slimtrain.registry.memory import transformed_specs


def _at_least_one(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"[{key.split('.')[0]}] {key.split('.')[1]} = {value!r}: allowed: an integer >= 1 (--{key} N)")


def check_settings(job_config: Any) -> None:
    """The trainer's own settings that used to fail late (after step 1, or at step 2) or train
    nonsense with exit 0: each refused here, before anything is built, naming the key, the value
    and what is allowed."""
    lr = job_config.optimizer.lr
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"[optimizer] lr = {lr!r}: allowed: a finite number > 0 (--optimizer.lr 3e-4)")
    _at_least_one("training.local_batch_size", job_config.training.local_batch_size)
    _at_least_one("training.seq_len", job_config.training.seq_len)
    if job_config.validation.enable:
        _at_least_one("validation.local_batch_size", job_config.validation.local_batch_size)
        _at_least_one("validation.seq_len", job_config.validation.seq_len)
        _at_least_one("validation.freq", job_config.validation.freq)
    if job_config.checkpoint.enable:
        _at_least_one("checkpoint.interval", job_config.checkpoint.interval)
    _at_least_one("metrics.log_freq", job_config.metrics.log_freq)
    section = job_config.slimtrain
    methods = section.methods
    if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
        raise ConfigError(f"[slimtrain] methods = {methods!r}: allowed: a list of method names, e.g. "
                          f'methods = ["<method>", ...] (--slimtrain.methods <method>,<method>; `slimtrain list` names them)')
    from slimtrain.titan_integration.checkpoint_guard import ON_DAMAGE

    if section.checkpoint_on_damage not in ON_DAMAGE:
        raise ConfigError(f"[slimtrain] checkpoint_on_damage = {section.checkpoint_on_damage!r}: allowed: "
                          f"{', '.join(ON_DAMAGE)}")
    if section.loss_log:
        folder = os.path.dirname(os.path.abspath(section.loss_log))
        if not os.path.isdir(folder):
            raise ConfigError(f"[slimtrain] loss_log = {section.loss_log!r}: its folder {folder} does not exist; "
                              f"allowed: a file in an existing, writable folder")
        if not os.access(folder, os.W_OK) or (os.path.exists(section.loss_log) and not os.access(section.loss_log, os.W_OK)):
            raise ConfigError(f"[slimtrain] loss_log = {section.loss_log!r} is not writable")
        if os.path.isdir(section.loss_log):
            raise ConfigError(f"[slimtrain] loss_log = {section.loss_log!r} is a folder; allowed: a file path")
    dump = os.path.abspath(job_config.job.dump_folder)
    probe = dump
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ConfigError(f"[job] dump_folder = {job_config.job.dump_folder!r}: {probe} is "
                          f"{'not a folder' if not os.path.isdir(probe) else 'not writable'}; allowed: a writable folder")


def check_targets(composition, specs) -> None:
    """Every method with targets matches at least one of the flavor's Linear layers by name (the
    model itself raised this only after it was built). Roles are checked on the real model: a
    parametrization renames them (weight -> B, A, S)."""
    from slimtrain.registry.composition import _selects_nothing
    from slimtrain.registry.targets import matches_any

    for method in composition.methods:
        patterns = method.target_patterns()
        if not patterns:
            continue
        if not any(s.is_linear and matches_any(s.module, patterns) for s in specs):
            raise ConfigError(_selects_nothing(method, [(s, None) for s in specs]))


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
    from slimtrain.titan_integration.flavors import describe, ffn_hidden_dim

    a = model_args
    if composition.model is None:  # the converter describes the built model later; the checks need it now
        composition.describe_model(describe(a))
    dense = llama_dense_specs(a.dim, ffn_hidden_dim(a), a.n_layers, a.vocab_size, a.n_heads, a.n_kv_heads)
    check_targets(composition, dense)
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
    check_settings(job_config)
    accelerator_checks.check_config(job_config)  # AC mode/option, compile and bf16 support of this machine
    check_shapes(composition, model_args)
