"""``slimtrain.prepare``: one call that makes any ``torch.nn.Module`` train with a composition.

Why: the composition's stages must run in one order (describe the model, parametrize, initialize
the factors, group the parameters, build the composed optimizer, install the memory layers; then
after each optimizer step the step hooks, and the LR factor on the schedule). Every trainer
(torchtitan's, the Hugging Face Trainer, a plain loop) goes through the functions here, so the
order has one owner::

    prepared = slimtrain.prepare(model, "plugins/sltrain.toml", sections={"sltrain": {"rank": 8}})
    scheduler = prepared.scheduler()               # LambdaLR: your schedule x the methods' factor
    for batch in data:
        loss = model(batch).backward()
        prepared.optimizer.step(); scheduler.step(); prepared.optimizer.zero_grad()
        prepared.after_step()                      # refactorization, momentum reset, merges ...

Bad input fails before the model changes: a model without ``nn.Linear`` layers, a method whose
targets match no module of the model, a model already prepared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from slimtrain.recipe import Recipe, load_recipe
from slimtrain.registry import (
    Capability,
    Composition,
    ConfigError,
    ModelDescription,
    OptimizerHyper,
    StepContext,
    TrainerSettings,
)
from slimtrain.registry.model_description import infer_description
from slimtrain.registry.parametrization import iter_parametrized
from slimtrain.registry.targets import iter_linears, matches_any



@dataclasses.dataclass
class Prepared:
    """What ``prepare`` returns: the model (parametrized in place), its composed optimizer with the
    memory layers installed, and the composition's step hooks and LR factor."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    composition: Composition
    description: ModelDescription
    parametrized: list[str]
    hyper: OptimizerHyper
    per_layer: Any = None  # the PerLayerStepper when per_layer_updates is composed

    def after_step(self, step: int | None = None) -> None:
        """Run the step hooks after optimizer step ``step`` (default: the optimizer's own count of
        completed steps, which survives a resume with the optimizer's state dict)."""
        done = self.optimizer.global_step if step is None else int(step)
        self.composition.after_step(StepContext(step=done, model_parts=[self.model], optimizers=[self.optimizer]))

    def lr_factor(self, step: int) -> float:
        """The methods' factor on the LR of 1-based step ``step`` (ReLoRA / momentum-reset re-warms)."""
        return self.composition.lr_factor(step)

    def lr_lambda(self, schedule: Callable[[int], float] | None = None) -> Callable[[int], float]:
        """A ``LambdaLR`` function: ``schedule(k) * lr_factor(k + 1)`` (k counts completed steps,
        the convention of torchtitan's and Hugging Face's schedulers)."""
        return combine_schedule(schedule or (lambda k: 1.0), self.composition)

    def scheduler(self, schedule: Callable[[int], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda(schedule))


def combine_schedule(schedule: Callable[[int], float], composition: Composition) -> Callable[[int], float]:
    """``schedule`` times the composition's LR factor, as a plain function (a LambdaLR state dict
    then stores nothing for it, so no composition ends up in a checkpoint)."""

    def combined(k: int, _base=schedule) -> float:
        return _base(k) * composition.lr_factor(k + 1)

    return combined


def check_model(model: nn.Module, composition: Composition) -> None:
    """Refuse, before anything changes, a model the composition cannot act on."""
    linears = list(iter_linears(model))
    if not linears:
        raise ConfigError(
            f"the model ({type(model).__name__}) has no nn.Linear layers: slimtrain's methods act on Linear "
            f"weights (a model built from Conv1D or fused custom layers needs nn.Linear projections)"
        )
    if any(True for _ in iter_parametrized(model)):
        raise ConfigError(f"the model ({type(model).__name__}) is already parametrized by slimtrain: prepare it once")
    master = composition.master_weights()
    if master is not None:  # a master-weights layer stores every parameter: refuse non-floating ones first
        from slimtrain.registry.master_weights import check_parameters

        check_parameters(model, master, composition.master_method.name)
    linear_names = [fqn for fqn, _ in linears]
    module_names = [fqn for fqn, _ in model.named_modules() if fqn]
    for m in composition.methods:
        patterns = m.target_patterns()
        if not patterns:
            continue
        parametrizes = Capability.PARAMETRIZATION in m.provides
        pool = linear_names if parametrizes else module_names
        if not any(matches_any(fqn, patterns) for fqn in pool):
            names = sorted({fqn.rsplit(".", 1)[-1] for fqn in linear_names})
            raise ConfigError(
                f"[{m.name}] targets = {list(patterns)!r} match no {'Linear layer' if parametrizes else 'module'} "
                f"of the model ({type(model).__name__}); candidate names: {', '.join(names)} "
                f"(set [{m.name}] targets to some of them)"
            )


def parametrize_model(model: nn.Module, composition: Composition, description: ModelDescription | None = None) -> list[str]:
    """Check the model, describe it to the methods, parametrize the targeted Linear weights.
    Works on the meta device too (the torchtitan converter calls it before sharding)."""
    check_model(model, composition)
    composition.describe_model(infer_description(model, description))
    return composition.apply_parametrizations(model)


def build_optimizer(model: nn.Module, composition: Composition, hyper: OptimizerHyper,
                    settings: TrainerSettings | None = None):
    """The composed optimizer over ``model`` with the composition's memory layers, through the method
    contract as the torchtitan builder installs them (a MASTER_WEIGHTS method's layer, on parameters
    already stored in its dtype: ``composition.store_parameters``; a STATE_CODEC method's codec; a
    STEPPER method's stepper, attached with the trainer's ``settings``). Returns (optimizer, stepper or None)."""
    groups = composition.param_groups(model)
    if not groups:
        raise ConfigError("the composition left no trainable parameters in the model")
    optimizer = composition.build_optimizer(groups, hyper)
    return optimizer, composition.install_memory_layers(optimizer, settings)


def prepare(
    model: nn.Module,
    recipe: str | Recipe | Mapping | list | Composition,
    *,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    lr: float | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    weight_decay: float | None = None,
    implementation: str | None = None,
    description: ModelDescription | None = None,
    initialize: bool = True,
    trainer: TrainerSettings | None = None,
) -> Prepared:
    """Parametrize ``model`` in place by ``recipe`` and build its composed optimizer.

    ``recipe``: a TOML recipe path (``plugins/sltrain.toml``; its ``[optimizer]`` settings are the
    defaults of ``lr`` ... ``weight_decay``), a list of method names, ``{"methods": [...],
    "<method>": {...}}`` or a built ``Composition``. ``sections`` override method keys.
    ``description``: the model's sizes where they cannot be inferred (see ``ModelDescription``).
    ``trainer``: the settings of the loop that will drive it (global-norm clipping, micro-batches
    per step), checked by every method before any change (``Method.check_trainer``) and handed to a
    stepper (per-layer updates step after the last micro-batch).
    ``initialize``: give the factors the methods' own initialization (as a torchtitan run does);
    False keeps what the parametrizations derive from the current weights (``right_inverse``).
    """
    if isinstance(recipe, Composition):
        composition, hyper_base = recipe, Recipe(recipe.method_names)
    else:
        hyper_base = load_recipe(recipe, sections)
        composition = hyper_base.compose()
    hyper = hyper_base.hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, implementation=implementation)
    if initialize and any(p.device.type == "meta" for p in model.parameters()):
        raise ConfigError("the model is on the meta device: materialize it first (or pass initialize=False "
                          "and initialize the factors yourself with composition.init_parametrized)")
    composition.check_trainer(trainer or TrainerSettings())
    fqns = parametrize_model(model, composition, description)
    if initialize:
        composition.init_parametrized(model)
    composition.store_parameters(model)  # a master-weights layer's storage dtype (values rounded)
    optimizer, stepper = build_optimizer(model, composition, hyper, trainer)
    return Prepared(model, optimizer, composition, composition.model, fqns, hyper, stepper)
