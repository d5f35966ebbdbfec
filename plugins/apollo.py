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
from slimtrain.registry.sharded import RowShards
from slimtrain.registry.subspace import refresh_seed, std_side
from slimtrain.registry.tensors import local_tensor
from slimtrain.registry.update_rule import OnReset, RuleParam, StateSpec, StepInfo, UpdateRule

SCALE_TYPES = ("channel", "tensor")
NORM_EPS = 1e-8  # added to ||R|| in the scaling factor and to prev in the limiter (the package's)


@dataclasses.dataclass(frozen=True)
class ApolloConfig:
    rank: int = 256
    update_proj_gap: int = 200
    scale: float = 1.0  # apollo-torch's key: the update is multiplied by sqrt(scale)
    scale_type: str = "channel"  # "channel" (APOLLO) or "tensor" (APOLLO-Mini)
    limiter: bool = True  # Fira's norm-growth limiter (apollo-torch's disable_nl = False)
    gamma: float = 1.01  # the limiter's allowed norm growth per step
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
    beta1, beta2 = betas
    low_m = low.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(low_m, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low_m, low_m, value=1 - beta2)
    return exp_avg.float() / exp_avg_sq.float().sqrt().add_(eps)


def channel_factor(direction: torch.Tensor, low: torch.Tensor, side: str) -> torch.Tensor:
    """``||Adam(R)_j|| / (||R_j|| + 1e-8)`` per channel, shaped to broadcast over G: per column of G
    (1 x n) for the left projection, per row (m x 1) for the right one. Local on any shard: a left R is
    replicated, a right R's rows are G's rows."""
    dim = 0 if side == "left" else 1
    norm = torch.linalg.vector_norm
    return norm(direction, dim=dim, keepdim=True) / (norm(low, dim=dim, keepdim=True) + NORM_EPS)


def tensor_factor(direction: torch.Tensor, low: torch.Tensor, rows: RowShards | None) -> torch.Tensor:
    """``||Adam(R)|| / (||R|| + 1e-8)`` for the whole matrix (a 0-d tensor); ``rows`` given when R is
    row-sharded (one all-reduce of two numbers)."""
    sums = torch.stack([direction.square().sum(), low.square().sum()])
    if rows is not None:
        sums = rows.allreduce(sums)
    return sums[0].sqrt() / (sums[1].sqrt() + NORM_EPS)


def norm_growth_limiter(
    scaled: torch.Tensor, prev: torch.Tensor, rows: RowShards, gamma: float
) -> torch.Tensor:
    """Fira's limiter as apollo-torch applies it: returns ``max(||S|| / (prev + 1e-8), gamma) / gamma``
    and sets ``prev = ||S|| / limiter``. With prev = -1 (created or reset) the ratio is negative, the
    limiter 1 and prev becomes ||S||: the package's first step, without a host sync."""
    norm = rows.allreduce(scaled.square().sum().reshape(1))[0].sqrt()
    limiter = torch.clamp(norm / (prev + NORM_EPS), min=gamma) / gamma
    prev.copy_(norm / limiter)
    return limiter


class ApolloRule(UpdateRule):
    """APOLLO's step on each selected matrix (FSDP2: ``RowShards`` all-reduces, never a gather)."""

    def __init__(self, method: str, *, rank: int, gap: int, scale: float, scale_type: str, limiter: bool, gamma: float):
        self.method = method
        self.rank, self.gap, self.scale = int(rank), int(gap), float(scale)
        self.scale_type, self.limiter, self.gamma = scale_type, bool(limiter), float(gamma)

    def check(self, spec: ParamSpec) -> None:
        super().check(spec)
        m, n = spec.shape
        if self.rank > min(m, n):
            raise ConfigError(
                f"[{self.method}] rank = {self.rank} is out of range for {spec.name} with shape "
                f"{m} x {n}; allowed: [1, {min(m, n)}] (the smaller dimension)"
            )

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        m, n = spec.shape
        r = self.rank
        left = std_side((m, n)) == "left"
        low_shape, layout = ((r, n), "replicate") if left else ((m, r), "rows")
        specs = [
            StateSpec("step", (), torch.float32, OnReset.ZERO, host=True, counter=True),
            StateSpec("proj", (m, r) if left else (r, n), torch.float32, OnReset.KEEP),
            StateSpec("exp_avg", low_shape, None, OnReset.ZERO, moment=True, layout=layout),
            StateSpec("exp_avg_sq", low_shape, None, OnReset.ZERO, moment=True, non_negative=True, layout=layout),
        ]
        if self.limiter:
            specs.append(StateSpec("limiter_prev", (), torch.float32, OnReset.INIT, init_value=-1.0))
        return specs

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
        if step_before % self.gap == 0:
            shape = (m, self.rank) if side == "left" else (self.rank, n)
            proj_state.copy_(gaussian_projection(shape, self.rank, self.projection_seed(p, step_before), g.device))
        proj = proj_state.float()
        if side == "left":  # R = P^T G = sum_k P_k^T G_k (r x n, replicated)
            low = rows.allreduce(rows.my_rows(proj).T @ g)
        else:  # R = G Q^T (m x r), row-sharded like G
            low = g @ proj.T
        state["step"] += 1
        t = step_before + 1
        direction = apollo_adam(local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]), low, info.betas, info.eps)
        if self.scale_type == "channel":
            phi = channel_factor(direction, low, side)
        else:
            phi = tensor_factor(direction, low, rows if side == "right" else None)
        scaled = g * phi
        if self.limiter:
            scaled.div_(norm_growth_limiter(scaled, state["limiter_prev"], rows, self.gamma))
        beta1, beta2 = info.betas
        step_size = info.lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p_local = local_tensor(p.param.data)
        p_local.add_((scaled * math.sqrt(self.scale)).to(p_local.dtype), alpha=-step_size)
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
            limiter=c.limiter, gamma=c.gamma,
        )


class ApolloMini(Apollo):
    name = "apollo_mini"
    summary = "APOLLO with rank 1 and one scaling factor per matrix (tensor-wise): SGD-like memory"
    Config = ApolloMiniConfig


@hookimpl
def register_methods(register):
    register(Apollo)
    register(ApolloMini)
