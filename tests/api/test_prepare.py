"""slimtrain.prepare on a model that is neither torchtitan's nor transformers' (hidden 64, 2 layers)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtrain
from slimtrain import ConfigError, ModelDescription
from slimtrain.registry.parametrization import iter_parametrized

ROOT = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, vocab)

    def forward(self, t):
        x = self.emb(t)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


SLTRAIN = {"methods": ["sltrain", "refactorization", "momentum_reset"], "sltrain": {"rank": 4, "targets": ["up", "down"]},
           "refactorization": {"every": 3}, "momentum_reset": {"every": 4, "warmup_steps": 2}}


def test_plain_loop_example_loss_falls(capsys):
    runpy.run_path(str(ROOT / "examples" / "plain_loop.py"), run_name="not_main")["main"](["--steps", "40"])
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < 0.25 * losses[0]


def test_prepare_parametrizes_describes_and_builds_optimizer():
    torch.manual_seed(0)
    model = Net()
    p = slimtrain.prepare(model, SLTRAIN, lr=1e-3)
    assert p.parametrized == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert len(list(iter_parametrized(model))) == 4
    assert p.description == ModelDescription(hidden_size=64, num_heads=4, num_layers=2, vocab_size=50, source="modules")
    assert all(m.model is p.description for m in p.composition.methods)
    assert p.description.head_dim == 16
    assert type(p.optimizer).__name__ == "ComposedOptimizer"
    owned = {id(q) for g in p.optimizer.param_groups for q in g["params"]}
    assert owned == {id(q) for q in model.parameters() if q.requires_grad}


def test_step_hooks_and_lr_factor_follow_the_composition():
    torch.manual_seed(0)
    model = Net()
    p = slimtrain.prepare(model, SLTRAIN, lr=1e-3)
    sched = p.scheduler()
    lrs, moments = [], []
    for _ in range(5):
        model(torch.randint(0, 50, (2, 8))).sum().backward()
        lrs.append(p.optimizer.param_groups[0]["lr"])
        p.optimizer.step()
        sched.step()
        p.optimizer.zero_grad()
        p.after_step()
        emb = model.emb.weight
        moments.append(float(p.optimizer.state[emb]["exp_avg"].abs().sum()))
    assert p.optimizer.global_step == 5
    assert moments[3] == 0.0 and moments[2] > 0 and moments[4] > 0  # momentum reset after step 4
    assert lrs == pytest.approx([1e-3 * p.lr_factor(s) for s in range(1, 6)])
    assert p.lr_factor(5) < 1.0  # the re-warm after the reset at step 4


def test_toml_recipe_gives_the_files_optimizer_settings():
    model = Net()
    p = slimtrain.prepare(model, str(ROOT / "plugins" / "sltrain.toml"), sections={"sltrain": {"rank": 4, "targets": ["up", "down"]}})
    assert p.hyper.lr == 0.003 and p.hyper.betas == (0.9, 0.95) and p.hyper.weight_decay == 0.0
    assert p.composition.method("sltrain").config.rank == 4


def test_model_without_linear_layers_is_refused_untouched():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
    with pytest.raises(ConfigError, match="has no nn.Linear layers"):
        slimtrain.prepare(model, ["sltrain"])


def test_targets_matching_nothing_are_refused_before_any_change():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"\[sltrain\] targets = \['wq', 'nope'\] match no Linear.*up"):
        slimtrain.prepare(model, {"methods": ["sltrain"], "sltrain": {"rank": 4, "targets": ["wq", "nope"]}})
    assert not list(iter_parametrized(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prepared_twice_and_unknown_recipe_sections_are_refused():
    model = Net()
    slimtrain.prepare(model, SLTRAIN)
    with pytest.raises(ConfigError, match="already parametrized"):
        slimtrain.prepare(model, SLTRAIN)
    with pytest.raises(ConfigError, match="galore.*do not list"):
        slimtrain.prepare(Net(), SLTRAIN, sections={"galore": {"rank": 2}})


def test_description_given_wins_and_is_checked():
    desc = slimtrain.registry.model_description.infer_description(Net(), ModelDescription(num_heads=8))
    assert desc.num_heads == 8 and desc.hidden_size == 64 and desc.head_dim == 8
    with pytest.raises(ConfigError, match="not a multiple"):
        ModelDescription(hidden_size=64, num_heads=6)
    with pytest.raises(ConfigError, match=r"\[adam_mini\] needs the model's num_heads"):
        ModelDescription(hidden_size=64).require("num_heads", method="adam_mini")
