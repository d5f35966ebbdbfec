"""Run-scale defaults of the CPU flavors (``tiny``, ``nano``), applied as command-line arguments.

Why: the recipes carry the papers' 60M settings (64 sequences per rank, 512 per step, validation
and checkpoints every 1000 steps), which are GPU-scale: on a 2-core CPU one such step of even the
tiny model takes minutes. The user's CPU command should only have to name the flavor and the
steps (``--model.flavor tiny --training.steps 300``), so choosing a CPU flavor also brings the
run scale below, for every key NOT given on the command line. They are appended to the argument
list (the CLI beats the TOML in torchtitan), so the user's own flags always win, and
``titan_integration/train.py`` prints what it added. Plain data: no torch/torchtitan import, since
this runs before torchtitan is imported.
"""

from __future__ import annotations

RUN_DEFAULTS: dict[str, dict[str, str]] = {
    "tiny": {
        "training.local_batch_size": "8",
        "training.global_batch_size": "-1",  # no gradient accumulation
        "validation.local_batch_size": "8",
        "validation.freq": "100",
        "validation.steps": "10",
        "checkpoint.interval": "100",
        "metrics.log_freq": "10",
    },
    "nano": {
        "training.local_batch_size": "4",
        "training.global_batch_size": "-1",
        "validation.local_batch_size": "4",
        "validation.freq": "50",
        "validation.steps": "2",
        "checkpoint.interval": "50",
        "metrics.log_freq": "5",
    },
}


def _given(argv: list[str], key: str) -> bool:
    dashed = key.replace("_", "-")
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in (f"--{key}", f"--{dashed}"):
            return True
    return False


def extra_args(flavor: str | None, argv: list[str]) -> list[str]:
    """The ``--key value`` pairs ``flavor``'s run defaults add to ``argv`` (keys already there stay)."""
    out: list[str] = []
    for key, value in RUN_DEFAULTS.get(flavor or "", {}).items():
        if not _given(argv, key):
            out += [f"--{key}", value]
    return out
