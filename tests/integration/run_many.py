"""Run several slimtrain trainings in ONE torchrun launch (integration-test helper).

    torchrun --nproc-per-node N tests/integration/run_many.py PLAN.json

Why: each launch of ``titan_integration/train.py`` spends ~6 s importing torch/torchtitan per
process, plus torchtitan's 2 s end-of-training sleep; the recipe sweep needs dozens of short runs.
This driver imports once and runs each entry of the plan exactly as ``titan_integration/train.py``
would (same argument completion, same registration, same ``SlimTrainer``), keeping the process
group alive between runs (torchtitan skips re-initializing it). Only torchtitan's 2 s sleep is
removed. PLAN.json: {"results": PATH, "runs": [{"name": str, "args": [...], "env": {...}}]};
rank 0 writes [{"name", "ok", "error"}] to PATH.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main() -> None:
    plan = json.load(open(sys.argv[1]))

    from titan_integration import cpu_shim

    cpu_shim.apply()

    import torch.distributed as dist
    import torchtitan.train as titan_train
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    # torchtitan sleeps 2 s at the end of every training; not useful between runs of one launch
    titan_train.time = types.SimpleNamespace(perf_counter=time.perf_counter, sleep=lambda s: None)
    init_logger()

    from registry import get_methods

    get_methods()
    from titan_integration import spec
    from titan_integration.train import complete_argv
    from titan_integration.trainer import SlimTrainer

    spec.register()
    results = []
    for run in plan["runs"]:
        saved_env = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        trainer = None
        started = time.perf_counter()
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
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        result["seconds"] = round(time.perf_counter() - started, 2)
        results.append(result)
        if dist.is_initialized():
            dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(plan["results"], "w") as f:
            json.dump(results, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
