"""torchtitan's Llama model and config classes, for benchmarks that build them directly.

Why a module of its own: only titan_integration/ imports torchtitan (tests/test_layering.py), and
the CPU shim must run before torchtitan is first imported.
"""

from __future__ import annotations

from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

from torchtitan.config.job_config import LRScheduler, Optimizer  # noqa: E402
from torchtitan.models.llama3 import Transformer, TransformerModelArgs  # noqa: E402

__all__ = ["LRScheduler", "Optimizer", "Transformer", "TransformerModelArgs"]
