"""What slimtrain adds around torchtitan's CheckpointManager: recipe and checksums at save; at
load, verified files, the same recipe, and a choice of what to do when either fails.

Why a wrapper of two methods (``dcp_save``, ``load``) and not a subclass: torchtitan's Trainer
builds its CheckpointManager itself; the trainer calls ``install`` on it right after.

Save (``dcp_save``, every save path of torchtitan goes through it): the step folder's old checksum
file is removed first (a folder written again is not a checkpoint until it is complete), then DCP
writes, then rank 0 writes the recipe (checkpoint_recipe.py) and the checksums of every file
(checkpoint_integrity.py). An OSError while saving (disk full) stops the run with a message naming
the folder and the free space; the folder has no checksum file, so no later resume takes it for a
checkpoint.

Load (``load``, newest step first, or the step of ``--checkpoint.load_step``):
- no checksum file (an interrupted save, or written before slimtrain recorded checksums): skipped,
  with a warning naming it; when no intact checkpoint is left, ``"stop"`` stops (a folder of
  checkpoints is never silently trained over from step 1) and ``"fallback"`` starts at step 1;
- a file that does not match: ``checkpoint_on_damage = "stop"`` raises naming the file,
  ``"fallback"`` warns and tries the previous checkpoint;
- a recipe that differs from the run's: refused, listing the differences, unless
  ``resume_weights_only``: then the model weights whose name and shape match are loaded, the run
  starts at step 0 with a fresh optimizer, and what was not loaded is listed.
"""

from __future__ import annotations

import logging
import os
import re

import torch.distributed as dist

from slimtrain.disk_space import free_space, write_failed_message
from slimtrain.registry import SlimtrainError
from slimtrain.titan_integration import checkpoint_integrity as integrity
from slimtrain.titan_integration import checkpoint_recipe

log = logging.getLogger("slimtrain")

ON_DAMAGE = ("stop", "fallback")


class CheckpointDamagedError(SlimtrainError):
    """A checkpoint file does not match its recorded checksum (and the user chose to stop)."""


class RecipeMismatchError(SlimtrainError):
    """The checkpoint was written by another recipe than this run's."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _steps(folder: str) -> list[int]:
    """Step folders with a ``.metadata`` (what torchtitan would consider), newest first."""
    if not os.path.isdir(folder):
        return []
    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"step-(\d+)", name)
        if match and os.path.isfile(os.path.join(folder, name, ".metadata")):
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, its cause/context, or one of DCP's per-rank failures."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():  # (exception, traceback) per rank
                todo += [x for x in (failure if isinstance(failure, tuple) else (failure,)) if isinstance(x, BaseException)]
    return None


def install(ck, recipe: dict, on_damage: str = "stop", weights_only: bool = False) -> None:
    """Wrap ``ck.dcp_save`` and ``ck.load`` of a torchtitan CheckpointManager (see module doc)."""
    if on_damage not in ON_DAMAGE:
        raise SlimtrainError(f"[slimtrain] checkpoint_on_damage = {on_damage!r}; allowed: {', '.join(ON_DAMAGE)}")
    original_save, original_load = ck.dcp_save, ck.load

    def finish(checkpoint_id: str) -> None:
        if _rank() != 0:
            return
        try:
            checkpoint_recipe.write_recipe(checkpoint_id, recipe)
        except OSError as exc:
            raise integrity.CheckpointSaveError(
                f"checkpoint not saved: {write_failed_message(checkpoint_id, exc)}") from None
        integrity.write_checksums(checkpoint_id)

    def dcp_save(state_dict, checkpoint_id, *args, **kwargs):
        if _rank() == 0:
            integrity.remove_checksums(checkpoint_id)
        try:
            ret = original_save(state_dict, checkpoint_id, *args, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP raises CheckpointException (a BaseException) for rank failures
            os_error = _os_error_in(exc)
            reason = (write_failed_message(checkpoint_id, os_error) if os_error is not None
                      else f"{type(exc).__name__}: {str(exc)[:500]} ({free_space(checkpoint_id)})")
            raise integrity.CheckpointSaveError(
                f"checkpoint of {checkpoint_id} not saved: {reason}; the folder "
                f"has no {integrity.CHECKSUM_FILE}, so a resume skips it") from exc
        future = getattr(ret, "upload_completion", ret)  # async saves: when the files are written
        if future is not None and hasattr(future, "add_done_callback"):
            future.add_done_callback(lambda f: f.exception() is None and finish(checkpoint_id))
        else:
            finish(checkpoint_id)
        return ret

    def load(step: int = -1) -> bool:
        if not ck.enable or not os.path.isdir(ck.folder):
            return original_load(step=step)  # nothing of ours (a first run, or an initial_load_path)
        candidates = _steps(ck.folder) if step == -1 else [step]
        for s in candidates:
            folder = ck._create_checkpoint_id(s)
            if not os.path.isdir(folder):
                return original_load(step=s)  # an explicit --checkpoint.load_step that does not exist
            problem = integrity.verify(folder)
            if problem == integrity.MISSING:
                message = (f"checkpoint {folder} has no {integrity.CHECKSUM_FILE} (a save that did not "
                           f"finish, or written before slimtrain recorded checksums)")
                if step != -1:
                    raise CheckpointDamagedError(f"{message}: refusing --checkpoint.load_step {step}")
                log.warning("slimtrain: %s: skipped", message)
                continue
            if problem is not None:
                message = f"checkpoint {folder} is damaged: {problem}"
                if step != -1:
                    raise CheckpointDamagedError(f"{message}. Stopping: --checkpoint.load_step {step} names it")
                if on_damage == "stop":
                    raise CheckpointDamagedError(
                        f"{message}. Stopping ([slimtrain] checkpoint_on_damage = \"stop\"; \"fallback\" "
                        f"resumes from the previous intact checkpoint instead)")
                log.warning("slimtrain: %s: falling back to the previous checkpoint", message)
                continue
            diff = checkpoint_recipe.differences(checkpoint_recipe.read_recipe(folder), recipe)
            if diff:
                if not weights_only:
                    raise RecipeMismatchError(
                        f"checkpoint {folder} was written by another recipe than this run's:\n  "
                        + "\n  ".join(diff)
                        + "\nResume with the checkpoint's recipe, use another --job.dump_folder, or pass "
                          "--slimtrain.resume_weights_only to start a new run (step 0, new optimizer) from "
                          "the weights whose names and shapes match")
                load_weights_only(ck, folder, diff)
                return True
            return original_load(step=s)
        if candidates:
            if on_damage == "stop":  # never start over silently over a folder of checkpoints
                raise CheckpointDamagedError(
                    f"no intact checkpoint in {ck.folder} (steps {', '.join(map(str, candidates))}: see the "
                    f"warnings above; checkpoints written before slimtrain recorded checksums have none). "
                    f"Stopping rather than starting over: use another --job.dump_folder to start a new run, or "
                    f"--slimtrain.checkpoint_on_damage fallback to start at step 1 in this folder")
            log.warning("slimtrain: no intact checkpoint in %s: training starts at step 1", ck.folder)
        return False

    ck.dcp_save, ck.load = dcp_save, load


def load_weights_only(ck, folder: str, diff: list[str]) -> None:
    """Load the model weights of ``folder`` whose names and shapes match this model; list the rest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torchtitan.components.checkpoint import MODEL

    saved = FileSystemReader(folder).read_metadata().state_dict_metadata
    other_states = tuple(f"{k}." for k in ck.states if k != MODEL) + tuple(k for k in ck.states if k != MODEL)
    saved_model = {k: v for k, v in saved.items() if not k.startswith(other_states)}
    model_sd = ck.states[MODEL].state_dict()
    to_load, dropped, fresh = {}, [], []
    for key, value in model_sd.items():
        md = saved_model.get(key)
        if md is None:
            fresh.append(key)
        elif isinstance(md, TensorStorageMetadata) and tuple(md.size) == tuple(value.shape):
            to_load[key] = value
        else:
            shape = tuple(md.size) if isinstance(md, TensorStorageMetadata) else "not a tensor"
            dropped.append(f"{key} (shape {shape} in the checkpoint, {tuple(value.shape)} here)")
    dropped += [f"{key} (not in this model)" for key in saved_model if key not in model_sd]
    if not to_load:
        raise RecipeMismatchError(f"--slimtrain.resume_weights_only: no weight of {folder} matches this model "
                                  f"by name and shape; nothing to load")
    dcp.load(to_load, checkpoint_id=folder)
    ck.states[MODEL].load_state_dict(to_load)
    lines = [f"slimtrain: --slimtrain.resume_weights_only: {folder} was written by another recipe:"]
    lines += [f"    {d}" for d in diff]
    lines.append(f"  loaded {len(to_load)} weights; the run starts at step 1 with a new optimizer, LR schedule "
                 f"and data order (later checkpoints overwrite same-numbered steps of this folder)")
    lines.append(f"  DROPPED from the checkpoint ({len(dropped)}): " + (", ".join(dropped) or "none"))
    lines.append(f"  kept at initialization, not in the checkpoint ({len(fresh)}): " + (", ".join(fresh) or "none"))
    log.warning("\n".join(lines))
