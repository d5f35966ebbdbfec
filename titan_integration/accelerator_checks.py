"""Checks of the GPU-path settings (mixed precision, torch.compile, activation checkpointing), run
before any model is built (``preflight.check_before_model``), so a setting this machine, this torch
or slimtrain cannot do fails with a message that names it, instead of deep inside torchtitan's
parallelize or at the first step.

Why here: torchtitan checks these only when it applies them, after the model is built (the AC mode
and ``selective_ac_option`` inside ``apply_ac``; a mode given in a TOML file is not checked by the
command-line parser), or not at all (``selective_ac_option = "0"`` divides by zero; a GPU without
bf16 or without triton fails in the first compiled step). A GPU minute is too dear to lose that way.
What the trainer already does is not repeated: on a machine without a GPU it turns bf16 off unless
``--slimtrain.cpu_mixed_precision`` (trainer.prepare_job_config), so bf16 is checked here only when
it will really run.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from slimtrain.registry import ConfigError

AC_MODES = ("none", "selective", "full")
_BF16_KEYS = ("mixed_precision_param", "mixed_precision_reduce", "dtype")


def check_activation_checkpoint(ac: Any) -> None:
    mode = getattr(ac, "mode", "none")
    if mode not in AC_MODES:
        raise ConfigError(
            f"[activation_checkpoint] mode = {mode!r} is not supported by slimtrain; allowed: "
            f"{', '.join(AC_MODES)} (torchtitan's memory_budget is not tested with slimtrain's methods)"
        )
    if mode == "selective":
        option = str(getattr(ac, "selective_ac_option", "2"))
        if option != "op" and not (option.isdigit() and int(option) >= 1):
            raise ConfigError(
                f"[activation_checkpoint] selective_ac_option = {option!r}: allowed 'op' (per operator) "
                f"or a positive integer N (every N-th block)"
            )


def check_compile(compile_config: Any, device_type: str) -> None:
    if not getattr(compile_config, "enable", False):
        return
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            f"--compile.enable: torch.compile is not supported by this torch ({torch.__version__}) on this "
            f"Python; run without --compile.enable"
        )
    backend = getattr(compile_config, "backend", "inductor")
    if device_type == "cpu" and backend == "inductor" and cpu_cxx() is None:
        raise ConfigError(
            f"--compile.enable on CPU needs a C++ compiler (inductor's CPU code generator): "
            f"{os.environ.get('CXX') or 'g++'} is not on PATH; install g++ (scripts/setup.sh does with apt), "
            f"set CXX, or run without --compile.enable"
        )
    if device_type == "cuda" and backend == "inductor":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(
                "--compile.enable on a GPU needs the `triton` package (inductor's GPU code generator), which "
                "is missing or does not match this torch; install it (the GPU wheels) or run without "
                "--compile.enable"
            )


def cpu_cxx() -> str | None:
    """The C++ compiler inductor's CPU backend calls (its default: $CXX, else g++), if on PATH."""
    return shutil.which(os.environ.get("CXX") or "g++")


def _cpu_runs_bf16() -> str:
    """'' when this torch computes bf16 on the CPU (matmul and autocast), else the error."""
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16)
        (x @ x).sum().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
    except Exception as exc:  # depends on the build
        return f"{type(exc).__name__}: {exc}"
    return ""


def check_bf16(training: Any, device_type: str) -> None:
    wants = [k for k in _BF16_KEYS if getattr(training, k, "float32") == "bfloat16"]
    if not wants:
        return
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"[training] {wants[0]} = 'bfloat16' but this GPU ({torch.cuda.get_device_name()}) has no bf16 "
            f"support; use --training.{wants[0]} float32"
        )
    if device_type == "cpu":
        problem = _cpu_runs_bf16()
        if problem:
            raise ConfigError(
                f"[training] {wants[0]} = 'bfloat16' with --slimtrain.cpu_mixed_precision, but this torch "
                f"({torch.__version__}) cannot compute bf16 on the CPU ({problem}); run without "
                f"--slimtrain.cpu_mixed_precision"
            )


def device_type() -> str:
    """The device the run will use: "cpu" under the CPU shim, else torch's accelerator type."""
    from slimtrain.titan_integration import cpu_shim

    if cpu_shim.is_active():
        return "cpu"
    return torch._utils._get_available_device_type() or "cpu"


def check_config(job_config: Any, device: str | None = None) -> None:
    """All the GPU-path checks, for the device the run will use ("cuda", "cpu", ...)."""
    device = device or device_type()
    check_activation_checkpoint(job_config.activation_checkpoint)
    check_compile(job_config.compile, device)
    check_bf16(job_config.training, device)
