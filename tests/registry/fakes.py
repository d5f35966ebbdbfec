"""Small fake methods, registered as a plugin for one test and unregistered after (as simonw/llm's
tests do), so composition rules are tested without depending on the built-in methods."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slimtrain.registry.update_rule import StateSpec, UpdateRule

from slimtrain.registry import (
    DEFAULT_TARGETS,
    Capability,
    FactorizedParametrization,
    HookStage,
    Method,
    Requirement,
    check_range,
    hookimpl,
)

CALLS: list[str] = []


@dataclasses.dataclass(frozen=True)
class FactorConfig:
    rank: int = 2
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        check_range("fake_factor", "rank", self.rank, low=1)


class _Factor(FactorizedParametrization):
    roles = ("B", "A")

    def __init__(self, out_f: int, in_f: int, rank: int) -> None:
        super().__init__("fake_factor", out_f, in_f)
        self.rank = rank

    def forward(self, B, A):
        return B @ A

    def right_inverse(self, W):
        return (W.new_zeros(W.shape[0], self.rank), W.new_zeros(self.rank, W.shape[1]))

    def initialize(self, originals, fqn):
        torch.nn.init.normal_(originals["B"])
        torch.nn.init.normal_(originals["A"])


class FakeFactor(Method):
    name = "fake_factor"
    Config = FactorConfig
    provides = frozenset({Capability.PARAMETRIZATION, Capability.FACTORIZED, Capability.MEMORY_ESTIMATE})

    def make_parametrization(self, linear: nn.Linear, fqn: str):
        return _Factor(linear.out_features, linear.in_features, self.config.rank)


class FakeFactor2(FakeFactor):
    name = "fake_factor2"


@dataclasses.dataclass(frozen=True)
class EveryConfig:
    every: int = 2


class FakeRefactor(Method):
    name = "fake_refactor"
    Config = EveryConfig
    provides = frozenset({Capability.STEP_HOOK})
    requires = (Requirement(Capability.FACTORIZED, "a factorized parametrization"),)
    hook_stage = HookStage.WEIGHTS

    def after_step(self, ctx):
        CALLS.append(f"{self.name}@{ctx.step}")


class FakeReset(Method):
    name = "fake_reset"
    Config = EveryConfig
    provides = frozenset({Capability.STEP_HOOK, Capability.LR_SCHEDULE})
    hook_stage = HookStage.OPTIMIZER_STATE

    def after_step(self, ctx):
        CALLS.append(f"{self.name}@{ctx.step}")

    def lr_factor(self, step: int) -> float:
        return 0.5 if step % self.config.every == 0 else 1.0


@dataclasses.dataclass(frozen=True)
class OptConfig:
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)


class FakeOpt(Method):
    name = "fake_opt"
    Config = OptConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.PARAM_GROUPS, Capability.MEMORY_ESTIMATE})

    def param_group_options(self, spec):
        return {"projected": True} if self.selects(spec) else None

    def update_rule(self):
        return SGDRule()


class SGDRule(UpdateRule):
    """Plain SGD with one declared momentum buffer (enough to exercise the contract)."""

    def state_specs(self, spec):
        return [StateSpec("momentum_buffer", spec.shape, layout="rows", moment=True)]

    def step(self, params, info):
        for p in params:
            buf = p.state["momentum_buffer"]
            buf.mul_(0.9).add_(p.grad)
            p.param.data.add_(buf, alpha=-info.lr)


class FakeOpt2(FakeOpt):
    name = "fake_opt2"


class FakeGroupClash(Method):
    name = "fake_clash"
    provides = frozenset({Capability.PARAM_GROUPS})

    def param_group_options(self, spec):
        return {"projected": False} if spec.is_linear else None


ALL = (FakeFactor, FakeFactor2, FakeRefactor, FakeReset, FakeOpt, FakeOpt2, FakeGroupClash)


class FakePlugin:
    @hookimpl
    def register_methods(self, register):
        for cls in ALL:
            register(cls)


class TinyBlock(nn.Module):
    """Module names shaped like torchtitan's LLaMA, small enough for unit tests."""

    def __init__(self, dim: int = 8, ffn: int = 12) -> None:
        super().__init__()
        self.attention = nn.Module()
        for n in ("wq", "wk", "wv", "wo"):
            setattr(self.attention, n, nn.Linear(dim, dim, bias=False))
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(dim, ffn, bias=False)
        self.feed_forward.w2 = nn.Linear(ffn, dim, bias=False)
        self.feed_forward.w3 = nn.Linear(dim, ffn, bias=False)
        self.attention_norm = nn.LayerNorm(dim)


class TinyModel(nn.Module):
    def __init__(self, dim: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(16, dim)
        self.layers = nn.ModuleDict({str(i): TinyBlock(dim) for i in range(layers)})
        self.output = nn.Linear(dim, 16, bias=False)
