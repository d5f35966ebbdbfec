"""Make torchtitan 0.2.2 train on a machine without any accelerator (CPU + gloo).

Why this exists: torchtitan picks ``"cuda"`` when ``torch._utils._get_available_device_type()``
finds no accelerator, and then fails at once (``torch._C`` has no ``_cuda_setDevice``). Several of
its modules copy the device type/module at import time (``torchtitan.tools.utils.device_type``),
so the fix has to be in place BEFORE ``torchtitan`` is imported; patching torchtitan afterwards is
too late. Four things are arranged (each was seen failing without it on torchtitan 0.2.2):

1. the available device type reports ``"cpu"`` (``torch._utils`` is where torchtitan reads it);
2. torchtitan's device module (``device_module`` globals in torchtitan.tools.utils, metrics,
   distributed.utils, profiling) is a stand-in that answers the memory monitor's calls (device
   name, properties, memory stats, peak reset, empty_cache);
3. that stand-in's ``current_device()`` returns ``0`` (torchtitan's barrier passes it as a device
   id; ``torch.cpu.current_device()`` returns the string ``"cpu"``). Only torchtitan sees it:
   torch's own ``_get_device_module("cpu")`` must keep answering "cpu", or DCP would allocate on 0,
   i.e. cuda:0;
4. FSDP2 reduces gradients with plain SUM: torchtitan sets a gradient divide factor of 1.0, which
   FSDP turns into ``ReduceOp.PREMUL_SUM``, and gloo has no PREMUL_SUM.

Nothing is patched when an accelerator is present: ``apply()`` is a no-op there, so the same
entry point serves GPU and CPU machines. ``apply()`` is idempotent.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import types
from dataclasses import dataclass

import torch
import torch._utils

_APPLIED = False


def needs_shim() -> bool:
    """True when torch sees no accelerator (the case torchtitan cannot handle by itself)."""
    return torch._utils._get_available_device_type() is None


def is_active() -> bool:
    """Whether ``apply()`` patched this process."""
    return _APPLIED


@dataclass
class _CpuProperties:
    name: str
    total_memory: int


def _total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 34


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _peak_rss_bytes()


def _make_cpu_device_module() -> types.ModuleType:
    """A module object that delegates to ``torch.cpu`` and adds what torchtitan's
    DeviceMemoryMonitor and barrier call. Memory "peaks" are the process's peak resident set size
    (the closest CPU analogue of CUDA's allocator peak; it cannot be reset, so reset is a no-op)."""
    mod = types.ModuleType("slimtrain_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("__"):
            setattr(mod, name, getattr(torch.cpu, name))

    def get_device_name(device=None) -> str:
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    def get_device_properties(device=None) -> _CpuProperties:
        return _CpuProperties(name=get_device_name(device), total_memory=_total_ram_bytes())

    def memory_stats(device=None) -> dict[str, int]:
        peak = _peak_rss_bytes()
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "active_bytes.all.current": _current_rss_bytes(),
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    def max_memory_allocated(device=None) -> int:
        return _peak_rss_bytes()

    def memory_allocated(device=None) -> int:
        return _current_rss_bytes()

    def _noop(*args, **kwargs) -> None:
        return None

    mod.get_device_name = get_device_name
    mod.get_device_properties = get_device_properties
    mod.memory_stats = memory_stats
    mod.max_memory_allocated = max_memory_allocated
    mod.memory_allocated = memory_allocated
    mod.reset_peak_memory_stats = _noop
    mod.reset_max_memory_allocated = _noop
    mod.empty_cache = _noop
    mod.set_device = _noop
    mod.current_device = lambda: 0
    mod.device_count = lambda: 1
    mod.is_available = lambda: True
    return mod


CPU_DEVICE_MODULE = _make_cpu_device_module()


def apply() -> bool:
    """Install the CPU patches when no accelerator is present. Returns whether the shim is active.

    Must run before anything imports torchtitan; raises if torchtitan was already imported with
    another device type (that would silently keep "cuda" in module globals).
    """
    global _APPLIED
    if _APPLIED:
        return True
    if not needs_shim():
        return False
    if "torchtitan.tools.utils" in sys.modules:
        tt_utils = sys.modules["torchtitan.tools.utils"]
        if getattr(tt_utils, "device_type", "cpu") != "cpu":
            raise RuntimeError(
                "slimtrain.titan_integration.cpu_shim.apply() must run before torchtitan is imported: "
                f"torchtitan already chose device type {tt_utils.device_type!r}"
            )

    # 1. device type: patched globally in torch._utils (torch's own callers then pick "cpu" too,
    # which is what they would do on this machine anyway).
    torch._utils._get_available_device_type = lambda: "cpu"

    # 4. FSDP2: plain SUM reduce-scatter/all-reduce (gloo lacks PREMUL_SUM; AVG is not reliable
    # either). The divide factor is then applied as a post-division (a no-op for factor 1.0).
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as fc

    original_factors = fc._get_gradient_divide_factors
    if not getattr(original_factors, "_slimtrain_patched", False):

        @functools.wraps(original_factors)
        def _get_gradient_divide_factors(
            reduce_scatter_group,
            all_reduce_group,
            reduce_dtype,
            device_type="",
            factor=None,
            force_sum_reduction_for_comms=False,
        ):
            if device_type == "cpu":
                force_sum_reduction_for_comms = True
            return original_factors(
                reduce_scatter_group,
                all_reduce_group,
                reduce_dtype,
                device_type,
                factor,
                force_sum_reduction_for_comms,
            )

        _get_gradient_divide_factors._slimtrain_patched = True  # type: ignore[attr-defined]
        fc._get_gradient_divide_factors = _get_gradient_divide_factors

    # 2 + 3. torchtitan's device module. torch._utils._get_device_module is NOT patched globally:
    # torch.distributed.checkpoint allocates on ``_get_device_module("cpu").current_device()``,
    # which must stay "cpu" (0 would mean cuda:0). Instead torchtitan is imported now, with the
    # device type above, and the module globals that hold its device module are swapped.
    _install_torchtitan_device_module()

    _APPLIED = True
    return True


_TORCHTITAN_DEVICE_MODULE_HOLDERS = (
    "torchtitan.tools.utils",
    "torchtitan.components.metrics",
    "torchtitan.distributed.utils",
    "torchtitan.tools.profiling",
)


def _install_torchtitan_device_module() -> None:
    import importlib

    for name in _TORCHTITAN_DEVICE_MODULE_HOLDERS:
        module = importlib.import_module(name)
        if getattr(module, "device_type", "cpu") != "cpu":
            raise RuntimeError(
                "slimtrain.titan_integration.cpu_shim.apply() must run before torchtitan is imported: "
                f"{name} already chose device type {module.device_type!r}"
            )
        module.device_module = CPU_DEVICE_MODULE
