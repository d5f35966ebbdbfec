"""The Hugging Face Trainer adapter: any slimtrain recipe trains a transformers ``LlamaForCausalLM``
with the Trainer's own loop, gradient accumulation, checkpointing and resume.

Install with ``pip install -e .[hf]``. Use::

    from slimtrain.hf import SlimtrainTrainer
    trainer = SlimtrainTrainer(model=LlamaForCausalLM(config), args=TrainingArguments(...),
                               train_dataset=ds, recipe="plugins/sltrain.toml", sections={"sltrain": {"rank": 8}})
    trainer.train()

Design (why a Trainer subclass, not only a callback): the composed optimizer must exist before
the Trainer builds its own, its schedule must carry the methods' LR factor, and a parametrized
model's state dict (factors, sparse values, their index buffers) must round-trip exactly through
a checkpoint, which ``save_pretrained`` (built for dense weights) does not promise:

- ``__init__`` checks the model is one the adapter knows, then calls ``slimtrain.prepare`` (the
  one path every trainer shares) with the TrainingArguments' learning rate, betas, epsilon and
  weight decay, and hands the composed optimizer to the Trainer;
- ``create_scheduler`` multiplies the Trainer's schedule by the composition's LR factor, with the
  convention of the torchtitan path (``lr(step s) = base * schedule(s - 1) * factor(s)``);
- ``SlimtrainStepHooks`` (a callback) runs the step hooks after each optimizer step
  (``on_optimizer_step``: after the accumulated micro-batches, once per true step);
- ``_save`` / ``_load_from_checkpoint`` write and read the parametrized state dict as one
  safetensors file, strictly (every key, no missing or extra one), so resume is bitwise.

Per-layer updates step inside backward, so gradient accumulation (more than one micro-batch per
step) and the Trainer's global-norm clipping are refused before training, naming the argument.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from slimtrain.api import Prepared, combine_schedule, prepare
from slimtrain.registry import ConfigError, TrainerSettings

#: model classes the adapter knows (their Linear names are in DEFAULT_TARGETS), by model_type
SUPPORTED = {"llama": "LlamaForCausalLM"}
PARAMETRIZED_WEIGHTS = "slimtrain_model.safetensors"


def check_supported(model) -> None:
    """Refuse, naming it and what is supported, a model the adapter does not know."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = type(model).__name__
    if SUPPORTED.get(model_type) != name:
        known = ", ".join(f"{cls} (model_type {mt!r})" for mt, cls in SUPPORTED.items())
        raise ConfigError(
            f"slimtrain's Hugging Face adapter does not know {name} (model_type {model_type!r}); it supports: {known}"
        )


class SlimtrainStepHooks(TrainerCallback):
    """Runs the composition's step hooks after each optimizer step of the Trainer."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.prepared.after_step()
        return control


class SlimtrainTrainer(Trainer):
    """``transformers.Trainer`` training with a slimtrain composition (see the module docstring)."""

    def __init__(self, model=None, args=None, *, recipe, sections=None, description=None, **kwargs: Any) -> None:
        if model is None or args is None:
            raise ConfigError("SlimtrainTrainer needs model= and args= (TrainingArguments)")
        check_supported(model)
        for key in ("optimizers", "optimizer_cls_and_kwargs", "model_init"):
            if kwargs.get(key) not in (None, (None, None)):
                raise ConfigError(f"SlimtrainTrainer builds the optimizer from the recipe: do not pass {key}=")
        from slimtrain.recipe import load_recipe

        loaded = load_recipe(recipe, sections)
        settings = TrainerSettings(
            max_norm=float(args.max_grad_norm or 0.0), grad_accumulation_steps=int(args.gradient_accumulation_steps),
        )
        self.slimtrain = prepare(
            model, loaded, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            weight_decay=args.weight_decay, description=description, trainer=settings,
        )
        callbacks = [*(kwargs.pop("callbacks", None) or []), SlimtrainStepHooks(self.slimtrain)]
        super().__init__(model=model, args=args, callbacks=callbacks, optimizers=(self.slimtrain.optimizer, None), **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created:
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ConfigError(
                    f"lr_scheduler_type {self.args.lr_scheduler_type!r} builds a {type(scheduler).__name__}: slimtrain "
                    f"needs a LambdaLR schedule (linear, cosine, constant, ...) to apply the methods' LR factor"
                )
            comp = self.slimtrain.composition
            scheduler.lr_lambdas = [combine_schedule(fn, comp) for fn in scheduler.lr_lambdas]
            # LambdaLR set the first LR from the plain schedule; recompute it with the factor
            for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base_lr * fn(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        return scheduler

    # -- checkpoints: the parametrized state dict, strictly -------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        import safetensors.torch
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        tensors = {k: v.detach().contiguous() for k, v in (state_dict or model.state_dict()).items()}
        meta = {"format": "pt", "slimtrain_methods": json.dumps(self.slimtrain.composition.method_names)}
        safetensors.torch.save_file(tensors, os.path.join(output_dir, PARAMETRIZED_WEIGHTS), metadata=meta)
        model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        import safetensors.torch

        path = os.path.join(resume_from_checkpoint, PARAMETRIZED_WEIGHTS)
        if not os.path.isfile(path):
            raise ConfigError(f"{resume_from_checkpoint} has no {PARAMETRIZED_WEIGHTS}: not a SlimtrainTrainer checkpoint")
        with safetensors.safe_open(path, "pt") as f:
            saved = json.loads((f.metadata() or {}).get("slimtrain_methods", "[]"))
        if saved != self.slimtrain.composition.method_names:
            raise ConfigError(f"{path} was trained with methods {saved}, this trainer composes {self.slimtrain.composition.method_names}")
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        target.load_state_dict(safetensors.torch.load_file(path), strict=True)
