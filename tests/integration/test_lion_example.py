"""The second example distribution (examples/slimtrain-lion-plugin, an optimizer rule), tested as the
first one is: pip-installed into a temp folder, found through its entry point. Its step equals the
Lion paper's algorithm written out here; with sltrain, galore (disjoint targets) and momentum_reset
it trains at 1 and 2 ranks and resumes bitwise."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import HERE, ROOT, TORCHRUN, _free_port, env, offline_args, read_log, resume_runs

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "slimtrain-lion-plugin"
STEPS, HALF = 4, 2


@pytest.fixture(scope="module")
def lion_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("lion_site")
    source = tmp_path_factory.mktemp("lion_src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source)  # setuptools builds in the source tree: keep the repo clean
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    return target


def site_env(site: Path) -> dict[str, str]:
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([str(site), e["PYTHONPATH"]])
    e.pop("SLIMTRAIN_LOAD_PLUGINS", None)
    return e


def test_lion_is_listed_from_its_distribution(lion_site):
    code = "from slimtrain.cli import main; main(['list', '--json'])"
    proc = subprocess.run([sys.executable, "-c", code], env=site_env(lion_site), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["lion"]["source"] == "slimtrain-lion-plugin 0.1.0"
    assert rows["lion"]["capabilities"] == ["memory_estimate", "optimizer"]


def test_lion_steps_follow_the_paper(lion_site, monkeypatch):
    monkeypatch.syspath_prepend(str(lion_site))
    from slimtrain_lion.lion import LionRule

    from slimtrain.registry import ParamSpec
    from slimtrain.registry.composed_optimizer import ComposedOptimizer

    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64)
    p = torch.nn.Parameter(w.float().clone())
    spec = ParamSpec("l.weight", "l", "weight", (5, 7), is_linear=True)
    lr, wd, b1, b2, lr_scale = 0.01, 0.1, 0.9, 0.99, 0.3
    opt = ComposedOptimizer([{"params": [p], "rule": "lion"}], rules={"lion": LionRule("lion", lr_scale)},
                            specs={p: spec}, lr=lr, betas=(b1, b2), weight_decay=wd)
    m = torch.zeros_like(w)
    for t in range(4):
        g = torch.randn(5, 7, dtype=torch.float64)
        p.grad = g.float()
        opt.step()
        c = b1 * m + (1 - b1) * g.float().double()
        w = w * (1 - lr * wd) - lr * lr_scale * torch.sign(c)
        m = b2 * m + (1 - b2) * g.float().double()
    torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, rtol=1e-5, atol=1e-6)


RECIPE = """
[slimtrain]
methods = ["sltrain", "lion", "galore", "momentum_reset"]

[sltrain]
rank = 8

[lion]
targets = ["*.feed_forward.*"]
roles = ["B", "A"]

[galore]
rank = 4
update_proj_gap = 2
targets = ["*.attention.*"]
roles = ["A"]

[momentum_reset]
every = 2
warmup_steps = 1
"""


def recipe_toml(tmp_path: Path) -> str:
    import re

    text = (ROOT / "plugins" / "sltrain.toml").read_text()
    text = re.sub(r"\[slimtrain\]\n(?:.*\n)*?\n(?=\[model\])", "", text)
    text = re.sub(r"\[sltrain\]\n(?:.*\n)*?\n(?=\[model\])", "", text)
    path = tmp_path / "lion.toml"
    path.write_text(RECIPE.lstrip() + "\n" + text)
    return str(path)


@pytest.mark.parametrize("nproc", [1, 2], ids=["1rank", "2ranks"])
def test_lion_composes_trains_and_resumes_bitwise(lion_site, offline_assets, tmp_path, nproc):
    base = ["--job.config_file", recipe_toml(tmp_path), *offline_args(offline_assets)]
    runs = resume_runs(base, tmp_path, STEPS, HALF)
    plan, results = tmp_path / "plan.json", tmp_path / "results.json"
    plan.write_text(json.dumps({"results": str(results), "runs": runs}))
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()),
           str(HERE / "run_many.py"), str(plan)]
    proc = subprocess.run(cmd, cwd=ROOT, env=site_env(lion_site), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and results.exists(), out[-6000:]
    for r in json.loads(results.read_text()):
        assert r["ok"], (r["name"], r["error"])
    assert "lion:" in out and "galore:" in out and "adamw:" in out  # each rule got parameters
    a, _ = read_log(tmp_path / "straight.jsonl")
    b, _ = read_log(tmp_path / "resumed.jsonl")
    assert [e["step"] for e in b] == list(range(1, STEPS + 1))
    assert all(math.isfinite(e["loss"]) for e in a)
    assert [e["loss"] for e in b] == [e["loss"] for e in a]
