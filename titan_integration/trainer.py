"""``SlimTrainer``: torchtitan's Trainer plus what a slimtrain run needs around the loop.

Why a subclass (``torchtitan.train.main`` takes the trainer class): the training loop itself stays
torchtitan's; this adds, in order of the run:

- before anything distributed or any model: checks of the job config (the defaults slimtrain
  needs are added by train.py's ``complete_argv``, their one owner), ``warmup_fraction``, fp32 on
  CPU, the composition (a bad recipe fails here with the registry's message), the per-layer
  checks on the flavor's shapes (preflight.py), and the embedded corpus (prepared on the first
  run; ranks wait on a file lock);
- around torchtitan's checkpointer (checkpoint_guard.py): the recipe and the checksums of every
  file with each checkpoint; at resume, damaged or unfinished checkpoints skipped or refused, and
  a checkpoint of another recipe refused (or, with ``resume_weights_only``, its matching weights
  loaded);
- after the first optimizer step: a memory breakdown, measured, next to the analytic estimate;
- at every optimizer step: a finiteness check of the step's loss across ranks BEFORE the
  optimizer applies the update. A NaN/Inf loss stops the run with a message; no checkpoint is
  written for that step, so the last good checkpoint is the newest one on disk;
- a check that the optimizer's step (the one owner of the true step) is the trainer's (also after a resume);
- at the end: a final validation (unless the last step was just validated) and a summary line.

Testing aid: ``SLIMTRAIN_FAULT_NAN_AT_STEP=k`` makes the loss of step k NaN (tests the stop path).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

from slimtrain.registry import ConfigError
from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torchtitan.train import Trainer  # noqa: E402

from slimtrain.titan_integration import (  # noqa: E402
    checkpoint_guard,
    checkpoint_recipe,
    context,
    data,
    memory,
    parallel_checks,
    preflight,
    safe_checkpoint,
    spec,
)
from slimtrain.titan_integration.converter import CONVERTER_NAME  # noqa: E402
from slimtrain.titan_integration.flavors import FLAVORS, ffn_hidden_dim  # noqa: E402
from slimtrain.titan_integration.optimizer import SlimtrainOptimizersContainer  # noqa: E402
from slimtrain.titan_integration.rng_state import STATE_KEY, RNGState  # noqa: E402

log = logging.getLogger("slimtrain")

FAULT_ENV = "SLIMTRAIN_FAULT_NAN_AT_STEP"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before applying that step."""


def prepare_job_config(job_config) -> None:
    """Defaults slimtrain needs, applied to the parsed config before the Trainer sees it."""
    if job_config.model.name != spec.TRAIN_SPEC_NAME:
        raise ConfigError(
            f"[model] name = {job_config.model.name!r}: slimtrain's trainer needs "
            f"name = {spec.TRAIN_SPEC_NAME!r} (its flavors: {', '.join(FLAVORS)})"
        )
    if job_config.model.flavor not in FLAVORS:
        raise ConfigError(
            f"[model] flavor = {job_config.model.flavor!r} is unknown; flavors: {', '.join(FLAVORS)}"
        )
    if CONVERTER_NAME not in job_config.model.converters:
        raise ConfigError(
            f"[model] converters = {list(job_config.model.converters)!r} lacks {CONVERTER_NAME!r}: start "
            f"runs with titan_integration/train.py, which adds it (and slimtrain's other defaults)"
        )
    frac = job_config.slimtrain.warmup_fraction
    if frac >= 0:
        if frac > 1:
            raise ConfigError(f"[slimtrain] warmup_fraction = {frac}: allowed: a number in [0, 1] (or < 0: off)")
        total = job_config.lr_scheduler.total_steps or job_config.training.steps
        job_config.lr_scheduler.warmup_steps = int(round(frac * total))
    if cpu_shim.is_active() and not job_config.slimtrain.cpu_mixed_precision:
        for key in ("mixed_precision_param", "mixed_precision_reduce"):
            if getattr(job_config.training, key, "float32") != "float32":
                log.info("slimtrain: no GPU: training.%s = float32 (bf16 is for GPUs; "
                         "--slimtrain.cpu_mixed_precision keeps it)", key)
                setattr(job_config.training, key, "float32")
        if job_config.training.dtype != "float32":
            log.info("slimtrain: no GPU: training.dtype = float32")
            job_config.training.dtype = "float32"


class SlimTrainer(Trainer):
    def __init__(self, job_config) -> None:
        prepare_job_config(job_config)
        # fail fast: compose (and validate every method section) before torch.distributed or a model
        context.reset()
        composition = context.composition_for(job_config)
        model_args = FLAVORS[job_config.model.flavor]
        preflight.check_before_model(job_config, composition, model_args)
        parallel_checks.check_before_model(job_config, composition, model_args)  # degrees vs world, flavor, recipe
        safe_checkpoint.install()  # before anything could load a checkpoint
        data.prepare_run_data(job_config, vocab_size=model_args.vocab_size)
        self._pending_losses: list[torch.Tensor] = []
        self._fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
        self._memory_logged = not job_config.slimtrain.memory_report
        super().__init__(job_config)
        self.optimizers.register_step_pre_hook(self._check_finite_before_update)
        self._checkpoint_rng_state()
        if self.checkpointer.enable:
            recipe = checkpoint_recipe.recipe_of(job_config.model.flavor, composition)
            checkpoint_guard.install(self.checkpointer, recipe, job_config.slimtrain.checkpoint_on_damage,
                                     job_config.slimtrain.resume_weights_only)
        if job_config.validation.enable and hasattr(self.validator, "on_result"):
            self.validator.on_result = lambda r: self._record(
                {"step": r["step"], "val_loss": r["loss"], "val_perplexity": r["perplexity"]}
            )
        ffn = ffn_hidden_dim(self.model_args)
        log.info(
            "slimtrain: flavor %s: dim %d, FFN %d, layers %d, heads %d, vocab %d",
            job_config.model.flavor, self.model_args.dim, ffn, self.model_args.n_layers,
            self.model_args.n_heads, self.model_args.vocab_size,
        )

    def _checkpoint_rng_state(self) -> None:
        """Add every rank's RNG state to torchtitan's checkpoint (see rng_state.py); skip restoring
        it from a checkpoint written by another number of ranks instead of failing the load."""
        ck = self.checkpointer
        if not ck.enable:
            return
        self.rng_state = RNGState(self.device.type)
        ck.states[STATE_KEY] = self.rng_state
        original_load = ck.load

        def load(step: int = -1) -> bool:
            restore = None
            found = ck._find_load_step() if step == -1 and os.path.isdir(ck.folder) else step
            source = ck._create_checkpoint_id(found) if found > 0 else None
            if not os.path.exists(ck.folder) and ck.initial_load_path and not ck.initial_load_model_only:
                source = ck.initial_load_path  # what torchtitan loads whole when the run has no folder yet
            if source is not None and not self.rng_state.present_in_checkpoint(source):
                log.warning("slimtrain: checkpoint %s has no RNG state for this rank "
                            "(other number of ranks?): RNG state not restored", source)
                restore = ck.states.pop(STATE_KEY)
            try:
                return original_load(step=step)
            finally:
                if restore is not None:
                    ck.states[STATE_KEY] = restore

        ck.load = load

    # -- per step -------------------------------------------------------------------------------
    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        loss = super().forward_backward_step(
            input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
        )
        if self._fault_step and self.step == self._fault_step:
            loss = loss * float("nan")
        self._pending_losses.append(loss.detach())
        return loss

    def _check_finite_before_update(self, optimizer, args, kwargs) -> None:
        losses, self._pending_losses = self._pending_losses, []
        if not losses:
            return
        # each rank's loss is (local loss sum / global valid tokens): their SUM is the global mean
        # loss, and a NaN/Inf on any rank makes the sum non-finite on every rank
        # under tensor parallelism the loss is a replicated DTensor (loss parallel), the same on the
        # tp ranks of one data-parallel rank: its plain value, and the sum counted once per dp rank
        from slimtrain.registry.tensors import full_tensor

        local = torch.stack([full_tensor(x).reshape(()) for x in losses]).sum().float()
        total = local.clone().reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        global_loss = total.item() / self.parallel_dims.tp
        if not math.isfinite(global_loss):
            folder = os.path.join(self.job_config.job.dump_folder, self.job_config.checkpoint.folder)
            kept = (
                f"the newest checkpoint in {folder} (if any) is from before this step and is kept"
                if self.job_config.checkpoint.enable
                else "checkpointing is disabled, nothing was saved"
            )
            raise NonFiniteLossError(
                f"non-finite training loss at step {self.step} (loss {global_loss}, this rank's "
                f"part {local.item()}); stopping "
                f"before the optimizer applies it; {kept}. Lower the learning rate or check the data"
            )
        self._record({"step": self.step, "loss": global_loss, "time": time.time()})

    def _record(self, entry: dict) -> None:
        path = self.job_config.slimtrain.loss_log
        if path and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def train_step(self, data_iterator):
        super().train_step(data_iterator)
        if isinstance(self.optimizers, SlimtrainOptimizersContainer):
            # the optimizer owns the true step (restored from the checkpoint); torchtitan counts its own
            owned = self.optimizers.global_step
            if owned != self.step:
                raise RuntimeError(f"the optimizer's step {owned} differs from trainer step {self.step}")
        if not self._memory_logged:
            self._memory_logged = True
            self._log_memory()

    def _log_memory(self) -> None:
        monitor = self.metrics_processor.device_memory_monitor
        stats = monitor.get_peak_stats()
        peak = int(stats.max_reserved_gib * 1024**3) if stats.max_reserved_gib >= 0 else -1
        label = "process peak RSS" if cpu_shim.is_active() else "allocator peak reserved"
        measured = memory.measure(self.model_parts, list(self.optimizers.optimizers), peak, label)
        self._record({"step": self.step, "memory": dataclasses.asdict(measured)})
        lines = [f"slimtrain memory after step {self.step} (this rank; sharded sizes under FSDP):"]
        lines += ["  " + line for line in measured.lines()]
        try:
            from slimtrain.registry import llama_dense_specs

            a = self.model_args
            dense = llama_dense_specs(a.dim, ffn_hidden_dim(a), a.n_layers, a.vocab_size, a.n_heads, a.n_kv_heads)
            est = context.current().composition.estimate_memory(dense, bytes_per_element=4)
            lines.append(
                f"  analytic (whole model, fp32): weights {est.weights_bytes / 2**20:.1f} MiB "
                f"({est.trainable_params:,} of {est.weight_params:,} params trainable), "
                f"optimizer state {est.optimizer_bytes / 2**20:.1f} MiB, extra buffers "
                f"{est.extra_bytes / 2**20:.1f} MiB"
            )
        except Exception as exc:  # the estimate is informative only; never stop a run for it
            lines.append(f"  analytic estimate unavailable: {exc}")
        log.info("\n".join(lines))

    # -- the run --------------------------------------------------------------------------------
    def train(self):
        try:
            super().train()
        except NonFiniteLossError as exc:
            log.error("slimtrain: %s", exc)
            raise
        if self.job_config.validation.enable and self.step > 0:
            validator = self.validator
            if self.step not in getattr(validator, "validated_steps", set()):
                validator.validate(self.model_parts, self.step)
            last = getattr(validator, "last", None)
            if last is not None:
                log.info(
                    "slimtrain: final validation at step %d: loss %.4f, perplexity %.2f",
                    last["step"], last["loss"], last["perplexity"],
                )
        if self.step > 0 and self.job_config.slimtrain.memory_report:
            # again at the end: the bench reads the last entry, whose peak covers the whole run
            self._log_memory()
