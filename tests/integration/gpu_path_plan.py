"""What the GPU-path tests (test_gpu_path.py, test_gpu_path_compile.py) share: every recipe with its
nano overrides, the mode flags, the tolerances (and why), and the checks of one run's losses and
compile counts."""

from __future__ import annotations

import math
from pathlib import Path

from .helpers import ROOT, RECIPE_OVERRIDES, offline_args, read_log

# Every plugins/*.toml: the shared nano overrides plus the 7B single-GPU recipe: SLTrain rank 512
# does not fit nano's 32-wide layers; alpha and delta as the other SLTrain recipes at nano, so its
# compiled model graph is theirs (inductor's cache serves it: ~20 s less per launch; the layer is
# the same code whatever the values); APOLLO-Mini's refresh every 2 steps, so one fires in the run.
ALL_RECIPES: dict[str, list[str]] = {
    **RECIPE_OVERRIDES,
    "sltrain_7b_single_gpu": ["--sltrain.rank", "8", "--sltrain.alpha", "32", "--sltrain.delta", "0.03",
                              "--apollo_mini.update_proj_gap", "2"],
}

# The default run's recipes: one per distinct machinery on the GPU path (the dense model under AdamW
# and under the two rules with the most of their own: GaLore's refresh, Muon's Newton-Schulz; SLTrain
# with refactorization and resets; LoRA merges; the low-rank refactorization; the 7B recipe's per-layer
# updates, 8-bit state and APOLLO-Mini). The other recipes (elementwise or projected rules on the same
# dense graph, and sub-cases of these) run in the slow set (`pytest -m slow`): every recipe, as before.
DEFAULT_RECIPES = ("full_rank", "galore", "muon", "sltrain_restarts", "relora", "low_rank_restarts",
                   "sltrain_7b_single_gpu")
RECIPE_SETS = {"representative": DEFAULT_RECIPES, "every_recipe": tuple(ALL_RECIPES)}


def recipe_sets():
    """pytest params: the representative set by default, every recipe under the ``slow`` mark."""
    import pytest

    return [pytest.param(RECIPE_SETS["representative"], id="representative"),
            pytest.param(RECIPE_SETS["every_recipe"], id="every_recipe", marks=pytest.mark.slow)]


BF16 = ["--slimtrain.cpu_mixed_precision"]
COMPILE = ["--compile.enable"]
FULL = ["--activation_checkpoint.mode", "full"]
SELECTIVE = ["--activation_checkpoint.mode", "selective"]  # option "2": every other block wrapped
SELECTIVE_OP = [*SELECTIVE, "--activation_checkpoint.selective_ac_option", "op"]

# Against the fp32 eager run of the same recipe and data (nano flavor, loss ~8.7 at init), every step:
# - bf16 (compiled or not): 0.05. bf16 keeps 8 significant bits, a relative rounding of 2^-9 (0.2%)
#   per stored value; one rounding of a loss of 8.7 alone is ~0.02; observed <= 4.1e-4 (1 rank) and
#   1.8e-3 (2 ranks) over 6 steps. A different update moves more: at step 6 the fp32 runs of full_rank,
#   galore and apollo_mini read 8.677, 8.399, 7.571 on the same data, so a wrong cast that changes
#   the update (a zeroed factor, a dropped gradient) is caught. At least one step must differ (bf16 ran).
# - compile alone (fp32): 1e-4 (inductor fuses and reorders reductions; observed 9.5e-7).
# - activation checkpointing alone (fp32): 1e-6 (it recomputes the same ops; observed equal).
# Resume within one mode: bitwise (the exact float of every step's loss).
BF16_TOL, COMPILE_TOL, AC_TOL = 0.05, 1e-4, 1e-6


def run(name: str, recipe: str, assets, work: Path, extra=(), steps: int = 6, folder: str | None = None,
        total: int | None = None, checkpoint: bool = False) -> dict:
    """One entry of a run_many plan; its loss log is work/<folder>.jsonl."""
    folder_path = work / (folder or name.replace("/", "_"))
    args = ["--job.config_file", f"plugins/{recipe}.toml", *offline_args(assets), *ALL_RECIPES[recipe], *extra,
            "--training.steps", str(steps), "--job.dump_folder", str(folder_path),
            "--slimtrain.loss_log", f"{folder_path}.jsonl"]
    args += ["--checkpoint.interval", "3"] if checkpoint else ["--checkpoint.no-enable"]
    if total:
        args += ["--lr_scheduler.total_steps", str(total)]
    return {"name": name, "args": args, "log": f"{folder_path}.jsonl", "compiled": "--compile.enable" in extra}


def plan(runs: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("name", "args")} for r in runs]


def losses(run_: dict) -> list[float]:
    train, _ = read_log(Path(run_["log"]))
    assert [e["step"] for e in train] == list(range(1, len(train) + 1)), run_["name"]
    return [e["loss"] for e in train]


def check_compile_counts(name: str, counts: dict) -> None:
    """Something was compiled, no graph break, and no recompilation but the final validation's: it
    runs the compiled blocks under no_grad (dynamo's guard "GLOBAL_STATE changed: grad_mode"), one per
    compiled frame, by torch's design."""
    assert counts["frames"] > 0, f"{name}: nothing was compiled: {counts}"
    assert counts["graph_breaks"] == 0, f"{name}: graph breaks {counts['graph_break_reasons']}"
    reasons = counts["recompile_reasons"]
    assert len(reasons) == counts["recompiles"], f"{name}: {counts}"
    other = [x for x in reasons if "grad_mode" not in x]
    assert not other, f"{name}: recompiles other than the validation's grad mode: {other}"
    functions = [x.split(" ... ")[0] for x in reasons]  # "Recompiling function <name> in <file>"
    assert len(set(functions)) == len(functions), f"{name}: a function recompiled twice: {reasons}"


def check_trains(name: str, got: list[float], steps: int = 6) -> None:
    assert len(got) == steps and all(math.isfinite(x) for x in got), f"{name}: {got}"
    half = steps // 2  # single steps are noisy at nano; the halves' means are not
    assert sum(got[half:]) < sum(got[:half]), f"{name}: loss did not fall: {got}"


def check_close(name: str, got: list[float], ref: list[float], tol: float, must_differ: bool = False) -> float:
    gap = max(abs(x - y) for x, y in zip(got, ref, strict=True))
    assert gap <= tol, f"{name}: {gap:.3g} from the fp32 eager run (tolerance {tol}):\n{got}\n{ref}"
    if must_differ:
        assert gap > 0, f"{name}: identical to the fp32 run: bf16 did not run"
    return gap


def recipe_files() -> set[str]:
    return {p.stem for p in (ROOT / "plugins").glob("*.toml")}
