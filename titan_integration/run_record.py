"""``<dump_folder>/slimtrain_run.json``: what a run was, for tools that read its checkpoints later.

Why: a DCP checkpoint holds tensors only. ``slimtrain export`` must rebuild the parametrized model
(flavor and its exact model args, methods and their sections) and find the tokenizer and
the held-out split the run used; the job config that knew them is gone when the run ends. The
converter writes this record (rank 0) when it is built, i.e. before the first checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

RECORD = "slimtrain_run.json"


def write(job_config: Any, composition) -> str | None:
    """Write the record; returns its path (None on ranks other than 0 or without a dump folder)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    job = getattr(job_config, "job", None)
    folder = getattr(job, "dump_folder", None)
    if not folder:
        return None
    from slimtrain.titan_integration.flavors import FLAVORS
    from slimtrain.titan_integration.job_config import section_values

    flavor = job_config.model.flavor
    args = dataclasses.asdict(FLAVORS[flavor]) if flavor in FLAVORS else None
    if args is not None:
        args["max_seq_len"] = int(job_config.training.seq_len)
    record = {
        "model_name": job_config.model.name,
        "flavor": flavor,
        "model_args": args,
        "methods": composition.method_names,
        "sections": {m: _plain(section_values(job_config, m)) for m in composition.method_names},
        "hf_assets_path": os.path.abspath(job_config.model.hf_assets_path or ""),
        "checkpoint_folder": os.path.abspath(os.path.join(folder, job_config.checkpoint.folder)),
        "validation": {
            "dataset": job_config.validation.dataset,
            "dataset_path": job_config.validation.dataset_path,
            "seq_len": job_config.validation.seq_len,
            "local_batch_size": job_config.validation.local_batch_size,
            "steps": job_config.validation.steps,
        },
        "loss_log": os.path.abspath(job_config.slimtrain.loss_log) if job_config.slimtrain.loss_log else "",
    }
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RECORD)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return path


def _plain(values: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def read(run_dir: str) -> dict:
    path = os.path.join(run_dir, RECORD)
    with open(path) as f:
        return json.load(f)
