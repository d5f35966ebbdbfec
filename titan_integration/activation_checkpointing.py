"""torchtitan's activation checkpointing on a bare model, for studies outside the trainer
(benchmarks/memory_tracker.py measures what each mode keeps; registry/ and benchmarks/ never
import torchtitan themselves)."""

from __future__ import annotations

MODES = ("none", "selective", "full")


def apply_activation_checkpointing(model, ac: str) -> None:
    """Wrap ``model``'s blocks as the trainer does: ``full`` every block, ``selective`` torchtitan's
    layer mode with ``selective_ac_option = "2"`` (every second block, counting from 1); ``none``
    leaves the model as it is."""
    if ac not in MODES:
        raise ValueError(f"activation checkpointing = {ac!r}; allowed: {', '.join(MODES)}")
    if ac == "none":
        return
    from torchtitan.config.job_config import ActivationCheckpoint
    from torchtitan.distributed import activation_checkpoint as titan_ac

    titan_ac._layer_sac_count = 0  # torchtitan counts blocks in a module global, across models
    titan_ac.apply_ac(model, ActivationCheckpoint(mode=ac, selective_ac_option="2"))
