"""APOLLO and APOLLO-Mini: SGD on the raw gradient, scaled by what Adam would do in a random subspace.

APOLLO (Zhu et al., arXiv 2412.05270) keeps Adam moments of a random Gaussian projection ``R`` of each
selected matrix's gradient (rank r, re-drawn from a seed every ``update_proj_gap`` steps), and uses
them only to measure how much Adam would rescale each channel: the update is the RAW gradient times
``phi_j = ||Adam(R)_j|| / ||R_j||`` per channel (APOLLO) or one ``phi`` per matrix (APOLLO-Mini, rank 1),
limited by Fira's norm-growth limiter and multiplied by ``sqrt(scale)``.

Conventions (those of the released package apollo-torch 1.0.3, which the tests compare against):

* ``scale`` is apollo-torch's ``scale`` key: the update is multiplied by ``sqrt(scale)``. The paper's
  alpha is ``sqrt(scale)`` (APOLLO-Mini's README setting ``scale = 128`` is the paper's alpha = sqrt(128)).
* the "std" side: ``R = G Q^T`` (Q: r x n) when m >= n, else ``R = P^T G`` (P: m x r); channels are
  the rows (m >= n) or the columns (m < n) of G. The projection is ``randn / sqrt(r)`` from a CPU
  generator seeded per parameter and refresh, so every rank draws the same matrix.
* Adam as in the package: ``eps`` added to ``sqrt(v)`` without bias correction, the bias correction
  ``sqrt(1 - b2^t) / (1 - b1^t)`` folded into the step size; decoupled weight decay AFTER the update
  (``W <- W - lr wd W``), the order of the package.
* the limiter acts on the scaled gradient before ``sqrt(scale)``: ``S <- S / (max(||S|| / prev, gamma) /
  gamma)``; the first step after creation or a reset only records ``||S||`` (prev = -1 there).

FSDP2 (docs/methods/frontier-optimizers.md): the rule never gathers a gradient. m < n: ``R = sum_k
P_k^T G_k`` is one all-reduce of r x n numbers (``RowShards.allreduce``), the moments are replicated;
m >= n: ``R = G_k Q^T`` is local to the row shard, the moments are row-sharded. The tensor-wise factor
of a row-sharded R and the limiter's norm are all-reduces of one or two numbers.

Memory: ``2 r max(m, n)`` moment elements and ``r min(m, n)`` for the stored projection per matrix
(the same accounting as GaLore's 1B figure, 4.76 GB; APOLLO-Mini 3.20 GB).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from slimtrain.registry import DEFAULT_TARGETS, Capability, ConfigError, Method, ParamSpec, check_choice, check_range, hookimpl
from slimtrain.registry.projected_moments import (
    ACCUMULATED,
    NORM_EPS,
    channel_ratio,
    check_rank,
    fold_projected,
    limiter_from_norm,
    limiter_state_spec,
    project,
    projected_accumulation_specs,
    projected_state_specs,
    scaled_norm,
    update_moments,
)
from slimtrain.registry.sharded import RowShards
from slimtrain.registry.subspace import refresh_seed, std_side
from slimtrain.registry.tensors import local_tensor
from slimtrain.registry.update_rule import RuleParam, StateSpec, StepInfo, UpdateRule

SCALE_TYPES = ("channel", "tensor")
ACCUMULATIONS = ("full", "projected")


@dataclasses.dataclass(frozen=True)
class ApolloConfig:
    rank: int = 256
    update_proj_gap: int = 200
    scale: float = 1.0  # apollo-torch's key: the update is multiplied by sqrt(scale)
    scale_type: str = "channel"  # "channel" (APOLLO) or "tensor" (APOLLO-Mini)
    limiter: bool = True  # Fira's norm-growth limiter (apollo-torch's disable_nl = False)
    gamma: float = 1.01  # the limiter's allowed norm growth per step
    #: per-layer updates with gradient accumulation: "full" (the gradient accumulated: the plain
    #: accumulated step) or "projected" (only R, r x n, kept between micro-batches; the raw gradient
    #: the update scales is then the LAST micro-batch's times k, an estimate of the step's)
    accumulation: str = "full"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        validate_apollo(self, "apollo")


@dataclasses.dataclass(frozen=True)
class ApolloMiniConfig(ApolloConfig):
    rank: int = 1
    scale: float = 128.0  # the paper's alpha = sqrt(128)
    scale_type: str = "tensor"

    def __post_init__(self) -> None:
        validate_apollo(self, "apollo_mini")


def validate_apollo(cfg: ApolloConfig, section: str) -> None:
    """Range checks (errors name the key, the value and the allowed range)."""
    check_range(section, "rank", cfg.rank, low=1)
    check_range(section, "update_proj_gap", cfg.update_proj_gap, low=1)
    check_range(section, "scale", cfg.scale, low=0, low_inclusive=False)
    check_choice(section, "scale_type", cfg.scale_type, SCALE_TYPES)
    check_range(section, "gamma", cfg.gamma, low=1.0)
    check_choice(section, "accumulation", cfg.accumulation, ACCUMULATIONS)
    if not cfg.targets:
        raise ConfigError(f"[{section}] targets = () is empty; name at least one module pattern")
    if not cfg.roles:
        raise ConfigError(f"[{section}] roles = () is empty; name at least one parameter role, e.g. 'weight'")



# -- the math, each piece on this rank's fp32 blocks ---------------------------------------------
def gaussian_projection(shape: tuple[int, int], rank: int, seed: int, device: torch.device) -> torch.Tensor:
    """``randn(shape) / sqrt(rank)`` from a CPU generator seeded with ``seed`` (the same matrix on
    every rank and device; apollo-torch's ``stable_randn`` on CPU draws the same numbers)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.randn(shape, generator=gen, dtype=torch.float32) / math.sqrt(rank)).to(device)


def apollo_adam(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, low: torch.Tensor, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """Update the moments with ``low`` in place; return ``m / (sqrt(v) + eps)`` (no bias correction:
    the package folds it into the step size)."""
    update_moments(exp_avg, exp_avg_sq, low, betas)
    return exp_avg.float() / exp_avg_sq.float().sqrt().add_(eps)


def tensor_factor(direction: torch.Tensor, low: torch.Tensor, rows: RowShards | None) -> torch.Tensor:
    """``||Adam(R)|| / (||R|| + 1e-8)`` for the whole matrix (a 0-d tensor); ``rows`` given when R is
    row-sharded (one all-reduce of two numbers)."""
    sums = torch.stack([direction.square().sum(), low.square().sum()])
    if rows is not None:
        sums = rows.allreduce(sums)
    return sums[0].sqrt() / (sums[1].sqrt() + NORM_EPS)


class ApolloRule(UpdateRule):
    """APOLLO's step on each selected matrix (FSDP2: ``RowShards`` all-reduces, never a gather)."""

    def __init__(
        self, method: str, *, rank: int, gap: int, scale: float, scale_type: str, limiter: bool, gamma: float,
        accumulation: str = "full",
    ):
        self.method = method
        self.accumulation = accumulation
        self.rank, self.gap, self.scale = int(rank), int(gap), float(scale)
        self.scale_type, self.limiter, self.gamma = scale_type, bool(limiter), float(gamma)

    def check(self, spec: ParamSpec) -> None:
        super().check(spec)
        check_rank(self.method, self.rank, spec)

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        specs = projected_state_specs(spec.shape, self.rank)
        if self.limiter:
            specs.append(limiter_state_spec("limiter_prev"))
        return specs

    def accumulation_specs(self, spec: ParamSpec) -> list[StateSpec] | None:
        return projected_accumulation_specs(spec.shape, self.rank) if self.accumulation == "projected" else None

    def accumulate(self, item: RuleParam, buffers: dict[str, torch.Tensor], micro: int, info: StepInfo) -> None:
        """R of each micro-batch summed; a refresh due in the step draws its (gradient-independent)
        projection before the first."""
        rows = RowShards(item.grad)
        side = std_side(rows.shape)
        proj_state = local_tensor(item.state["proj"])
        step_before = int(item.state["step"].item())
        if micro == 0 and step_before % self.gap == 0:
            m, n = rows.shape
            shape = (m, self.rank) if side == "left" else (self.rank, n)
            proj_state.copy_(gaussian_projection(shape, self.rank, self.projection_seed(item, step_before), rows.local.device))
        fold_projected(buffers, rows, proj_state, side)

    def projection_seed(self, p: RuleParam, step_before: int) -> int:
        """The seed of the projection drawn before step ``step_before + 1`` (tests override it)."""
        return refresh_seed(p.group_index, p.index, step_before)

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        for p in params:
            self._step_one(p, info)

    def _step_one(self, p: RuleParam, info: StepInfo) -> None:
        state = p.state
        rows = RowShards(p.grad)
        m, n = rows.shape
        side = std_side((m, n))
        g = rows.local
        step_before = int(state["step"].item())
        proj_state = local_tensor(state["proj"])
        if p.accumulated is not None:  # R summed over the micro-batches; g the last one's, times k
            low, g = p.accumulated[ACCUMULATED], g * p.micro_batches
        else:
            if step_before % self.gap == 0:
                shape = (m, self.rank) if side == "left" else (self.rank, n)
                proj_state.copy_(gaussian_projection(shape, self.rank, self.projection_seed(p, step_before), g.device))
            low, _ = project(rows, proj_state.float(), side)
        state["step"] += 1
        t = step_before + 1
        direction = apollo_adam(local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]), low, info.betas, info.eps)
        if self.scale_type == "channel":
            phi = channel_ratio(direction, low, side)  # ||Adam(R)_j|| / (||R_j|| + 1e-8)
        else:
            phi = tensor_factor(direction, low, rows if side == "right" else None)
        beta1, beta2 = info.betas
        step_size = info.lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        # W <- W - step_size sqrt(scale) (G phi) / limiter as ONE fused pass over W and G: the
        # limiter needs only ||G phi|| (from G's row or column norms), so the scaled gradient is
        # never formed (the package forms it, scales it twice and adds it: four passes)
        coef = phi * (-step_size * math.sqrt(self.scale))
        if self.limiter:
            coef = coef / limiter_from_norm(scaled_norm(g, phi, rows), state["limiter_prev"], self.gamma)
        p_local = local_tensor(p.param.data)
        if g.dtype != p_local.dtype:
            g = g.to(p_local.dtype)
        p_local.addcmul_(g, coef.to(p_local.dtype))
        if info.weight_decay != 0:  # after the update, as the package
            p_local.add_(p_local, alpha=-info.lr * info.weight_decay)


class Apollo(Method):
    name = "apollo"
    summary = "SGD on the raw gradient scaled channel-wise by Adam's effect in a random rank-r projection"
    Config = ApolloConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def selects(self, spec: ParamSpec) -> bool:
        return self.selects_any_shape(spec)

    def update_rule(self) -> ApolloRule:
        c = self.config
        return ApolloRule(
            self.name, rank=c.rank, gap=c.update_proj_gap, scale=c.scale, scale_type=c.scale_type,
            limiter=c.limiter, gamma=c.gamma, accumulation=c.accumulation,
        )


class ApolloMini(Apollo):
    name = "apollo_mini"
    summary = "APOLLO with rank 1 and one scaling factor per matrix (tensor-wise): SGD-like memory"
    Config = ApolloMiniConfig


@hookimpl
def register_methods(register):
    register(Apollo)
    register(ApolloMini)
