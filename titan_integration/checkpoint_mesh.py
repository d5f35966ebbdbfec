"""Will the checkpoint this run loads fit the run's mesh? Checked before the model is built.

Why: DCP reshards model and optimizer state onto any placement (a 4-rank HSDP checkpoint loads under
2-rank FSDP2, or under FSDP x TP), but torchtitan's data-loader position is saved per data-parallel
rank (``dataloader.dp_rank_<k>``) and its loader asserts, after the model is built and sharded, that
the data-parallel size did not change ("dataloader resharding is not supported yet"), without
saying what to do. Reading the checkpoint's metadata (a small file) tells the data-parallel size it
was written with, so the run stops at once with the way out: ``--checkpoint.exclude_from_loading
dataloader`` (the data restarts from its beginning; everything else is resumed).
"""

from __future__ import annotations

import os
import re
from typing import Any

from slimtrain.registry import ConfigError

_STEP = re.compile(r"step-(\d+)")
_DP_KEY = re.compile(r"dataloader\.dp_rank_(\d+)$")


def checkpoint_to_load(job_config: Any) -> tuple[str, bool] | None:
    """(folder, model_only) of the checkpoint torchtitan will load, or None: when the run's
    checkpoint folder exists, the step given by ``checkpoint.load_step`` or its newest complete
    ``step-N``; otherwise ``checkpoint.initial_load_path`` (as torchtitan 0.2.2's CheckpointManager.load)."""
    ck = job_config.checkpoint
    if not ck.enable:
        return None
    folder = os.path.join(job_config.job.dump_folder, ck.folder)
    steps = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            m = _STEP.fullmatch(name)
            if m and os.path.isfile(os.path.join(folder, name, ".metadata")):
                steps.append(int(m.group(1)))
    if os.path.exists(folder):  # torchtitan then loads from here only (initial_load_path is ignored)
        if not steps:
            return None
        step = ck.load_step if ck.load_step > 0 and ck.load_step in steps else max(steps)
        return os.path.join(folder, f"step-{step}"), False
    if ck.initial_load_path:
        return ck.initial_load_path, bool(ck.initial_load_model_only)
    return None


def saved_data_parallel_size(path: str) -> int | None:
    """How many data-parallel ranks wrote the data-loader position in the checkpoint at ``path``."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - not a DCP folder: torchtitan's own load reports it
        return None
    ranks = {int(m.group(1)) for k in keys if (m := _DP_KEY.match(k))}
    return len(ranks) or None


def check_data_position(job_config: Any, data_parallel: int) -> None:
    """Raise ConfigError when the checkpoint to load holds a data-loader position of another
    data-parallel size and the run would load it."""
    found = checkpoint_to_load(job_config)
    if found is None:
        return
    path, model_only = found
    if model_only or "dataloader" in list(job_config.checkpoint.exclude_from_loading):
        return
    saved = saved_data_parallel_size(path)
    if saved is not None and saved != data_parallel:
        p = job_config.parallelism
        raise ConfigError(
            f"the checkpoint {path} was written by {saved} data-parallel ranks, this run has "
            f"parallelism.data_parallel_shard_degree x parallelism.data_parallel_replicate_degree = "
            f"{data_parallel // p.data_parallel_replicate_degree} x {p.data_parallel_replicate_degree} = {data_parallel}: "
            f"model and optimizer state reshard onto the new mesh, but torchtitan's data-loader position "
            f"cannot; resume with --checkpoint.exclude_from_loading dataloader (the data restarts from its "
            f"beginning) or with {saved} data-parallel ranks"
        )
