"""The third example distribution (examples/slimtrain-bf16-memory-layer, a memory layer: moments in
bf16 with stochastic rounding), tested as the Lion example is: pip-installed into a temp folder and
found through its entry point; composed with galore and apollo its step equals the same composition
without it whose moments are rounded after each step; the memory model counts its bytes; it trains
at 2 ranks and resumes bitwise."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import HERE, ROOT, TORCHRUN, _free_port, offline_args, read_log, resume_runs
from .test_lion_example import site_env

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "slimtrain-bf16-memory-layer"
METHODS = ["galore", "apollo", "bf16_state"]
SECTIONS = {"galore": {"rank": 4, "update_proj_gap": 2, "targets": ["*attention*"]},
            "apollo": {"rank": 4, "update_proj_gap": 2, "targets": ["*feed_forward*"]}}


@pytest.fixture(scope="module")
def bf16_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("bf16_site")
    source = tmp_path_factory.mktemp("bf16_src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, source)  # setuptools builds in the source tree: keep the repo clean
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    return target


@pytest.fixture
def bf16_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from slimtrain_bf16_state import bf16_state

    from slimtrain.registry import register_plugin, unregister_plugin

    register_plugin(bf16_state, name="test-bf16-state")
    yield bf16_state
    unregister_plugin("test-bf16-state")


def test_the_example_is_short():
    lines = sum(len(p.read_text().splitlines()) for p in EXAMPLE.rglob("*.py"))
    assert lines < 100, lines


def test_listed_from_its_distribution(bf16_site):
    code = "from slimtrain.cli import main; main(['list', '--json'])"
    proc = subprocess.run([sys.executable, "-c", code], env=site_env(bf16_site), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["bf16_state"]["source"] == "slimtrain-bf16-memory-layer 0.1.0"
    assert rows["bf16_state"]["capabilities"] == ["state_codec"]


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values(bf16_plugin):
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    r = bf16_plugin.stochastic_bf16(x).float()
    assert torch.all((r - x).abs() <= x.abs() * 2**-7)  # within one bf16 step
    nearest = (x.to(torch.bfloat16).float() - x).abs().mean()
    assert (r - x).mean().abs() < 0.01 * nearest  # unbiased: mean error far below one rounding
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(bf16_plugin.stochastic_bf16(exact).float(), exact)


def _net(seed: int = 0):
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Module()
    net.attention, net.feed_forward = nn.Module(), nn.Module()
    net.attention.wq = nn.Linear(16, 12, bias=False)
    net.feed_forward.w1 = nn.Linear(12, 20, bias=False)
    net.norm = nn.LayerNorm(16)
    net.forward = lambda x: net.feed_forward.w1(net.attention.wq(net.norm(x)))
    return net


def test_composes_with_galore_and_apollo_as_rounding_after_each_step(bf16_plugin):
    from slimtrain.registry import OptimizerHyper, compose

    hyper = OptimizerHyper(lr=0.01, weight_decay=0.1)
    with_layer, plain = compose(METHODS, SECTIONS), compose(METHODS[:2], SECTIONS)
    net_a, net_b = _net(), _net()
    opt_a = with_layer.build_optimizer(with_layer.param_groups(net_a), hyper)
    assert opt_a.install_codec(with_layer.state_codec()) == 8  # 2 moments of wq, w1, norm weight and bias
    opt_b = plain.build_optimizer(plain.param_groups(net_b), hyper)
    xs = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(1))
    for x in xs:
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            net(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        for p, decls in opt_b.declared.items():  # the independent statement: round the moments after
            for d in decls:
                if d.moment:
                    opt_b.state[p][d.name] = bf16_plugin.stochastic_bf16(opt_b.state[p][d.name]).float()
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(a, b), name
    stored = {k: v.dtype for st in opt_a.state.values() for k, v in st.items()}
    assert stored["exp_avg_bf16"] == torch.bfloat16 and stored["proj"] == torch.float32
    assert {"galore", "apollo"} <= {g["rule"] for g in opt_a.param_groups}


def test_the_memory_model_counts_its_bytes(bf16_plugin):
    from slimtrain.registry import compose, llama_dense_specs
    from slimtrain.registry.device_memory import device_memory

    dense = llama_dense_specs(64, 160, 2, 256, 4)
    kw = dict(dim=64, ffn=160, layers=2, heads=4, vocab=256, batch=2, seq_len=16, bytes_per_element=4)
    with_layer = device_memory(compose(METHODS, SECTIONS), dense, **kw)
    plain = device_memory(compose(METHODS[:2], SECTIONS), dense, **kw)
    comp = compose(METHODS[:2], SECTIONS)
    from slimtrain.registry.memory import transformed_specs

    specs, _ = transformed_specs(comp, dense)
    plan = comp.routing(specs)
    moments = sum(d.numel for s in plan.specs for d in plan.rule_of(s).state_specs(s) if d.moment and d.shape)
    assert plain.optimizer - with_layer.optimizer == 2 * moments  # fp32 (4 bytes) -> bf16 (2 bytes)


def test_slimtrain_memory_device_counts_it(bf16_site, tmp_path):
    recipe = tmp_path / "bf16.toml"
    recipe.write_text((ROOT / "plugins" / "galore.toml").read_text().replace(
        'methods = ["galore"]', 'methods = ["galore", "bf16_state"]'))
    code = f"from slimtrain.cli import main; main(['memory', '--flavor', '60m', '--device', '--json', '--recipes', {str(recipe)!r}])"
    proc = subprocess.run([sys.executable, "-c", code], env=site_env(bf16_site), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)[0]
    assert row["methods"][-1] == "bf16_state" and row["optimizer_gb"] > 0


RECIPE = """
[slimtrain]
methods = ["galore", "apollo", "bf16_state"]

[galore]
rank = 4
update_proj_gap = 2
targets = ["*.attention.*"]

[apollo]
rank = 4
update_proj_gap = 2
targets = ["*.feed_forward.*"]
"""


def test_trains_and_resumes_bitwise_at_2_ranks(bf16_site, offline_assets, tmp_path):
    import re

    text = (ROOT / "plugins" / "galore.toml").read_text()
    text = re.sub(r"\[slimtrain\]\n(?:.*\n)*?\n(?=\[model\])", "", text)
    text = re.sub(r"\[galore\]\n(?:.*\n)*?\n(?=\[model\])", "", text)
    path = tmp_path / "bf16.toml"
    path.write_text(RECIPE.lstrip() + "\n" + text)
    base = ["--job.config_file", str(path), *offline_args(offline_assets)]
    runs = resume_runs(base, tmp_path, 4, 2)
    plan, results = tmp_path / "plan.json", tmp_path / "results.json"
    plan.write_text(json.dumps({"results": str(results), "runs": runs}))
    cmd = [*TORCHRUN, "--nproc-per-node", "2", "--master-port", str(_free_port()), str(HERE / "run_many.py"), str(plan)]
    proc = subprocess.run(cmd, cwd=ROOT, env=site_env(bf16_site), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and results.exists(), out[-6000:]
    for r in json.loads(results.read_text()):
        assert r["ok"], (r["name"], r["error"])
    assert "galore:" in out and "apollo:" in out
    a, _ = read_log(tmp_path / "straight.jsonl")
    b, _ = read_log(tmp_path / "resumed.jsonl")
    assert [e["step"] for e in b] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) for e in a)
    assert [e["loss"] for e in b] == [e["loss"] for e in a]
