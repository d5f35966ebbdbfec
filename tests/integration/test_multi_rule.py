"""Several optimizer methods in one recipe through the user's training command (run_many runs each
training exactly as titan_integration/train.py does): galore on attention with fira on the MLP, and
galore on SLTrain's B/A factors while S gets AdamW; 1 and 2 ranks (FSDP2), resume bitwise."""

from __future__ import annotations

import math
import re

import pytest

from .helpers import ROOT, offline_args, read_log
from .shared_launch import planner

pytestmark = pytest.mark.integration

STEPS, HALF = 4, 2

RECIPES = {
    "galore_attn_fira_mlp": (
        ["galore", "fira"],
        '[galore]\nrank = 8\nupdate_proj_gap = 2\ntargets = ["*.attention.*"]\n\n'
        '[fira]\nrank = 8\nupdate_proj_gap = 2\ntargets = ["*.feed_forward.*"]\n\n',
    ),
    "sltrain_galore_factors": (
        ["sltrain", "galore", "momentum_reset"],
        '[sltrain]\nrank = 8\n\n[galore]\nrank = 4\nupdate_proj_gap = 2\nroles = ["B", "A"]\n\n'
        '[momentum_reset]\nevery = 2\nwarmup_steps = 1\n\n',
    ),
}


def recipe_toml(tmp_path, name: str) -> str:
    methods, sections = RECIPES[name]
    text = (ROOT / "plugins" / "galore.toml").read_text()
    text = re.sub(r'methods = \["galore"\]', "methods = " + repr(methods).replace("'", '"'), text)
    text = re.sub(r"\[galore\]\n(?:.*\n)*?\n(?=\[model\])", sections, text)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


@planner("multi_rule")
def plan(assets, work):
    runs = []
    for name in RECIPES:
        base = ["--job.config_file", recipe_toml(work, name), *offline_args(assets)]
        straight, resumed = work / f"{name}_straight", work / f"{name}_resumed"
        runs += [
            {"name": f"{name}/straight", "args": [*base, "--training.steps", str(STEPS), "--job.dump_folder",
                                                   str(straight), "--slimtrain.loss_log", f"{straight}.jsonl"]},
            {"name": f"{name}/half", "args": [*base, "--training.steps", str(HALF), "--lr_scheduler.total_steps",
                                               str(STEPS), "--job.dump_folder", str(resumed),
                                               "--slimtrain.loss_log", f"{resumed}.jsonl"]},
            {"name": f"{name}/resume", "args": [*base, "--training.steps", str(STEPS), "--job.dump_folder",
                                                 str(resumed), "--slimtrain.loss_log", f"{resumed}.jsonl"]},
        ]
    return [{**run, "log_file": str(work / (run["name"].replace("/", "_") + ".log"))} for run in runs]


@pytest.mark.launch("multi_rule")
@pytest.mark.parametrize("nproc", [1, 2], ids=["1rank", "2ranks"])
def test_disjoint_optimizer_methods_train_and_resume_bitwise(launched, nproc):
    results, tmp_path = launched
    log = (tmp_path / "galore_attn_fira_mlp_straight.log").read_text() + (tmp_path / "sltrain_galore_factors_straight.log").read_text()
    for name in RECIPES:
        for kind in ("straight", "half", "resume"):
            assert results[f"{name}/{kind}"]["ok"], results[f"{name}/{kind}"]["error"]
        straight, _ = read_log(tmp_path / f"{name}_straight.jsonl")
        resumed, _ = read_log(tmp_path / f"{name}_resumed.jsonl")
        assert [e["step"] for e in resumed] == list(range(1, STEPS + 1)), name
        assert all(math.isfinite(e["loss"]) for e in straight)
        assert [e["loss"] for e in resumed] == [e["loss"] for e in straight], name
    # each rule got its parameters (the optimizer's description in the log)
    assert re.search(r"galore: \d+ elements, .*fira: \d+ elements", log) or re.search(r"fira: \d+ elements, .*galore: \d+ elements", log)
    assert re.search(r"adamw: \d+ elements", log)
