"""The ``slimtrain`` torchtitan model converter: validates the composition and parametrizes the model.

Why a converter: torchtitan calls ``convert(model)`` on the meta-device model right after building
it and BEFORE parallelize (TP, activation checkpointing, per-block compile, fully_shard). That is
the only place where ``register_parametrization`` works (after fully_shard it fails), and the only
time structure may change (the checkpointer caches the state-dict keys once, later).

- ``__init__`` builds the composition from the job config: unknown methods, bad values and invalid
  combinations fail here with the registry's message, before any model exists; so does tensor or
  pipeline parallelism with a parametrizing method (TP cannot shard parametrized Linears; PP
  splits the model into parts this integration does not wrap).
- ``convert`` applies the parametrizations through ``slimtrain.api.parametrize_model`` (the same
  checks, model description and order as ``slimtrain.prepare``) and wraps the model instance's ``init_weights``: the
  model's own init runs inside ``composition.capture_init`` (so LoRA keeps it as its frozen W0),
  then ``composition.init_parametrized`` initializes the factors. That order matters because
  ``init_weights`` writes ``linear.weight`` with trunc_normal_, which under a parametrization goes
  to a temporary and is silently lost; the factors must be initialized afterwards, in place (they
  are sharded DTensors by then).
- ``convert`` also gives the parameters a master-weights layer's storage dtype
  (``Composition.store_parameters``, e.g. bf16): here, on the meta device before fully_shard, is
  where the model's parameters get their storage dtype, so FSDP2 shards and gathers that dtype, the
  init writes it and the gradients arrive in it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

import torch.nn as nn  # noqa: E402
from slimtrain.registry import Capability, CompositionError  # noqa: E402
from torchtitan.protocols.model_converter import (  # noqa: E402
    _registry_model_converter_cls,
    register_model_converter,
)

from slimtrain.titan_integration import context  # noqa: E402

log = logging.getLogger("slimtrain")

CONVERTER_NAME = "slimtrain"


class SlimtrainConverter:
    """torchtitan ModelConverter; see the module docstring."""

    def __init__(self, job_config, parallel_dims) -> None:
        self.job_config = job_config
        self.composition = context.composition_for(job_config)
        if self.composition.has_parametrization:
            unsupported = []
            unplanned = [m.name for m in self.composition.with_capability(Capability.PARAMETRIZATION)
                         if not getattr(m, "tensor_parallel", False)]
            if parallel_dims.tp_enabled and unplanned:  # the others: tensor_parallel.py shards their factors
                unsupported.append(f"tensor parallelism (tensor_parallel_degree={parallel_dims.tp})")
            if parallel_dims.pp_enabled:
                unsupported.append(f"pipeline parallelism (pipeline_parallel_degree={parallel_dims.pp})")
            if unsupported:
                parametrizing = [m.name for m in self.composition.with_capability(Capability.PARAMETRIZATION)]
                raise CompositionError(
                    f"{' and '.join(unsupported)} is not supported with a weight-parametrizing method "
                    f"({', '.join(parametrizing)}) yet: use data parallelism (FSDP2/HSDP) only, i.e. "
                    f"--parallelism.tensor_parallel_degree 1 --parallelism.pipeline_parallel_degree 1"
                )
        log.info("%s", self.composition.describe())
        from slimtrain.titan_integration import run_record

        try:
            run_record.write(job_config, self.composition)  # what `slimtrain export` reads later
        except (AttributeError, OSError) as exc:  # a partial job config (tests) or an unwritable folder
            log.warning("slimtrain: no %s written (%s): `slimtrain export` will not find this run", run_record.RECORD, exc)

    def convert(self, model: nn.Module) -> None:
        from slimtrain.api import parametrize_model
        from slimtrain.titan_integration.flavors import FLAVORS, describe

        comp = self.composition
        args = getattr(model, "model_args", None) or FLAVORS.get(self.job_config.model.flavor)
        desc = describe(args) if args is not None else None
        embeddings = getattr(model, "tok_embeddings", None)
        if desc is not None and isinstance(embeddings, nn.Embedding):  # the vocabulary the model was built with
            desc = dataclasses.replace(desc, vocab_size=embeddings.num_embeddings)
        fqns = parametrize_model(model, comp, desc)
        context.current().parametrized = list(fqns)
        stored = comp.store_parameters(model)  # a master-weights layer's storage dtype, before sharding
        if stored:
            log.info("slimtrain: %s stores %d parameters as %s", comp.master_method.name, stored,
                     comp.master_weights().storage_dtype)
        if fqns:
            log.info("slimtrain: parametrized %d Linear weights (e.g. %s)", len(fqns), fqns[0])
            _wrap_init_weights(model, comp)

    def post_optimizer_hook(self, model) -> None:
        # Step hooks need the true step number, which this hook is not given: they run from the
        # optimizer container (slimtrain.titan_integration.optimizer) instead.
        return None


def _wrap_init_weights(model: nn.Module, comp) -> None:
    original = model.init_weights
    if getattr(original, "_slimtrain_wrapped", False):
        return

    @functools.wraps(original)
    def init_weights(*args, **kwargs):
        with comp.capture_init():
            original(*args, **kwargs)
        comp.init_parametrized(model)

    init_weights._slimtrain_wrapped = True  # type: ignore[attr-defined]
    # an instance attribute: only this model instance changes, not torchtitan's Transformer class
    object.__setattr__(model, "init_weights", init_weights)


def register() -> None:
    """Register the converter with torchtitan (idempotent: torchtitan asserts on a second one)."""
    if _registry_model_converter_cls.get(CONVERTER_NAME) is SlimtrainConverter:
        return
    if CONVERTER_NAME in _registry_model_converter_cls:
        raise RuntimeError(f"another model converter is already registered as {CONVERTER_NAME!r}")
    register_model_converter(SlimtrainConverter, CONVERTER_NAME)
