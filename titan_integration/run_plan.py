"""Run several slimtrain trainings in ONE torchrun launch.

    torchrun --nproc-per-node N -m slimtrain.titan_integration.run_plan PLAN.json

Why: each launch of ``titan_integration/train.py`` spends seconds importing torch/torchtitan per
process (tens of seconds with CUDA), plus torchtitan's 2 s end-of-training sleep; the integration
tests and ``gpu_check`` need many short runs. This driver imports once and runs each entry of the
plan exactly as ``titan_integration/train.py`` would (same argument completion, same registration,
same ``SlimTrainer``), keeping the process group alive between runs (torchtitan skips
re-initializing it). Only torchtitan's 2 s sleep is removed. Between runs torch._dynamo is reset,
so every run compiles its own model as a fresh process would, and its compile counts are its own.

PLAN.json: {"results": PATH, "runs": [{"name": str, "args": [...], "env": {...}, "log_file": PATH}]}
("env" and "log_file" optional; "log_file": the run's own log records, as the process logs them,
written by rank 0 - the launch's output holds every run's); rank 0 writes
[{"name", "ok", "error", "seconds", "compile", "live_objects"}] to PATH after EVERY run (so a launch
killed by a time limit keeps the finished runs; "live_objects": objects the garbage collector tracks
after the run's cleanup, which a run must not leave growing). "compile": frames compiled, graphs,
graph breaks (by reason) and recompilations (from torch._dynamo's "recompiles" log).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    del sys.path[0]  # as train.py: this folder's module names must not shadow top-level ones


def _reset_compile_state() -> None:
    """Each run compiles its own model: forget earlier runs' graphs and counters, so recompile
    limits and the counts below are per run (as in a process that trains once)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _RECOMPILES.clear()


def _remember_tyro_source_misses() -> None:
    """Parse each run's arguments in a few ms instead of ~0.2 s.

    tyro reads each field's help comment from its class's source. torchtitan's merged JobConfig is
    made at run time (module ``types``): ``inspect.getsource`` searches types.py, fails, and tyro,
    which caches results but not failures, does it again for every field of every parse. Here a
    class whose source was not found is remembered, and the failure is raised again at once. A
    tyro without this internal (another version) is left as it is."""
    try:
        from tyro import _docstrings
    except ImportError:
        return
    tokenization = getattr(_docstrings, "_ClassTokenization", None)
    make = getattr(tokenization, "make", None)
    if make is None or getattr(make, "_slimtrain_misses", None) is not None:
        return
    misses: dict[tuple[str, str], str] = {}  # (module, qualname) -> the message: no class, no traceback kept

    def make_or_known_miss(clz):
        key = (getattr(clz, "__module__", ""), getattr(clz, "__qualname__", repr(clz)))
        if key in misses:
            raise OSError(misses[key])
        try:
            return make(clz)
        except OSError as exc:
            misses[key] = str(exc)
            raise

    make_or_known_miss._slimtrain_misses = misses
    tokenization.make = staticmethod(make_or_known_miss)


def _run_log_handler(path: str | None) -> logging.Handler | None:
    """A handler on the root logger (torchtitan's, and slimtrain's loggers propagate to it) that
    writes this run's records to ``path``, on rank 0 only."""
    if not path or int(os.environ.get("RANK", "0")) != 0:
        return None
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(name)s - %(levelname)s - %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _free_memory() -> None:
    """Drop the finished run's model, optimizer and compiled code before the next run (whose peak
    memory is measured from torchtitan's monitor, which resets the allocator's peak when it is built)."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _compile_counts() -> dict:
    """torch._dynamo's counters of this run: frames compiled, graphs, graph breaks by reason,
    recompilations (frames compiled again after a guard failed)."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {
        "frames": int(counters["frames"].get("ok", 0)),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(breaks.values())),
        "graph_break_reasons": {k[:200]: int(v) for k, v in breaks.items()},
        "recompiles": _RECOMPILES.count,
        "recompile_reasons": _RECOMPILES.reasons[:20],
    }


class _RecompileCounter(logging.Handler):
    """Counts torch._dynamo's "recompiles" log records (one per recompilation, with the reason)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count, self.reasons = 0, []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        msg = record.getMessage()
        at = msg.find("triggered by")
        self.reasons.append((msg[:120] + " ... " + msg[at:at + 400]) if at >= 0 else msg[:500])

    def clear(self) -> None:
        self.count, self.reasons = 0, []


_RECOMPILES = _RecompileCounter()


def _watch_recompiles() -> None:
    import torch._logging

    torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    logger.addHandler(_RECOMPILES)


def main() -> None:
    plan = json.load(open(sys.argv[1]))

    from slimtrain.titan_integration import cpu_shim

    cpu_shim.apply()

    import torch.distributed as dist
    import torchtitan.train as titan_train
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    # torchtitan sleeps 2 s at the end of every training; not useful between runs of one launch
    titan_train.time = types.SimpleNamespace(perf_counter=time.perf_counter, sleep=lambda s: None)
    init_logger()
    _watch_recompiles()

    from slimtrain.registry import get_methods

    get_methods()
    from slimtrain.titan_integration import spec
    from slimtrain.titan_integration.train import complete_argv
    from slimtrain.titan_integration.trainer import SlimTrainer

    spec.register()
    _remember_tyro_source_misses()
    # Everything alive now (torch, torchtitan, the plugins) lives as long as the process: leave it
    # out of every later collection (a full one walked it in ~0.2 s, several times a run).
    gc.freeze()
    results = []
    for run in plan["runs"]:
        saved_env = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        trainer = None
        started = time.perf_counter()
        _reset_compile_state()
        run_log = _run_log_handler(run.get("log_file"))
        try:
            config = ConfigManager().parse_args(complete_argv(run["args"]))
            trainer = SlimTrainer(config)
            trainer.train()
            result = {"name": run["name"], "ok": True, "error": None}
        except Exception as exc:  # recorded for the test to assert on
            result = {"name": run["name"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            if trainer is not None:
                trainer.close()
            trainer = None
            if run_log is not None:
                logging.getLogger().removeHandler(run_log)
                run_log.close()
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        result["seconds"] = round(time.perf_counter() - started, 2)
        result["compile"] = _compile_counts()
        _free_memory()  # after the counts: also drops dynamo's compiled code of this run
        result["live_objects"] = len(gc.get_objects())  # what the collector tracks, less the frozen startup
        results.append(result)
        if not dist.is_initialized() or dist.get_rank() == 0:
            with open(plan["results"] + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(plan["results"] + ".tmp", plan["results"])
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
