"""Projected moments: Adam moments kept in a rank-r projection of a matrix's (row-sharded) gradient.

The pieces every rule that projects a gradient repeats, written once: the rank check, the state it
declares (a step counter, the projection, two moments in the projected shape), the projection and
its back-projection on a row shard, the moment update, the per-channel norm ratio of an Adam
direction to its input, and the norm-growth limiter. Built-in rules and third-party plugins use the
same functions, so a fix or a speed-up here reaches all of them.

Sides follow ``registry.subspace.std_side``: ``"left"`` (m < n) keeps P (m x r) and ``R = P^T G``
(r x n, replicated under FSDP2: one all-reduce); ``"right"`` keeps Q (r x n) and ``R = G Q^T``
(m x r, row-sharded like G, local).
"""

from __future__ import annotations

import torch

from slimtrain.registry.errors import ConfigError
from slimtrain.registry.method import ParamSpec
from slimtrain.registry.sharded import RowShards
from slimtrain.registry.subspace import std_side
from slimtrain.registry.update_rule import OnReset, StateSpec

#: added to ``||R||`` in the channel ratio and to the previous norm in the limiter (the released
#: packages' constant)
NORM_EPS = 1e-8


def check_rank(method: str, rank: int, spec: ParamSpec) -> None:
    """Refuse a rank above the matrix's smaller dimension, naming the method, parameter and range."""
    m, n = spec.shape
    if rank > min(m, n):
        raise ConfigError(
            f"[{method}] rank = {rank} is out of range for {spec.name} with shape "
            f"{m} x {n}; allowed: [1, {min(m, n)}] (the smaller dimension)"
        )


def projected_state_specs(shape: tuple[int, int], rank: int) -> list[StateSpec]:
    """``step`` (host counter), ``proj`` (P: m x r left, Q: r x n right; fp32, kept by a reset) and
    the moments ``exp_avg``, ``exp_avg_sq`` in R's shape (replicated left, row-sharded right)."""
    m, n = shape
    left = std_side((m, n)) == "left"
    low_shape, layout = ((rank, n), "replicate") if left else ((m, rank), "rows")
    return [
        StateSpec("step", (), torch.float32, OnReset.ZERO, host=True, counter=True),
        StateSpec("proj", (m, rank) if left else (rank, n), torch.float32, OnReset.KEEP),
        StateSpec("exp_avg", low_shape, None, OnReset.ZERO, moment=True, layout=layout),
        StateSpec("exp_avg_sq", low_shape, None, OnReset.ZERO, moment=True, non_negative=True, layout=layout),
    ]


#: the accumulation buffer of a projected rule (per-layer updates with gradient accumulation)
ACCUMULATED = "grad_low"


def projected_accumulation_specs(shape: tuple[int, int], rank: int) -> list[StateSpec]:
    """The buffer a projected rule accumulates micro-batch gradients into: R's shape (r x n left,
    replicated; m x r right, row-sharded), fp32."""
    m, n = shape
    left = std_side((m, n)) == "left"
    low_shape, layout = ((rank, n), "replicate") if left else ((m, rank), "rows")
    return [StateSpec(ACCUMULATED, low_shape, torch.float32, layout=layout)]


def fold_projected(buffers: dict[str, torch.Tensor], rows: RowShards, proj: torch.Tensor, side: str) -> None:
    """Add this micro-batch's R (``project``) into ``buffers[ACCUMULATED]`` (created at the first)."""
    low, _ = project(rows, proj.float(), side)
    if ACCUMULATED in buffers:
        buffers[ACCUMULATED].add_(low)
    else:
        buffers[ACCUMULATED] = low.float().clone() if low.dtype != torch.float32 else low


def basis_of(rows: RowShards, proj: torch.Tensor, side: str) -> torch.Tensor:
    """The back-projection's basis ``project`` returns, without projecting: this rank's rows of P
    (left) or Q (right)."""
    return rows.my_rows(proj) if side == "left" else proj


def limiter_state_spec(name: str) -> StateSpec:
    """The limiter's previous norm: -1 after creation or a reset (the first step is not limited)."""
    return StateSpec(name, (), torch.float32, OnReset.INIT, init_value=-1.0)


def project(rows: RowShards, proj: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, basis)``: R = P^T G (left, all-reduced over row shards) or G Q^T (right, local), and
    the basis the back-projection multiplies by (this rank's rows of P, or Q)."""
    g = rows.local
    if side == "left":
        p_rows = rows.my_rows(proj)
        return rows.allreduce(p_rows.T @ g), p_rows
    return g @ proj.T, proj


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    """``P N`` (left, this rank's rows) or ``N Q`` (right)."""
    return basis @ low if side == "left" else low @ basis


def update_moments(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, low: torch.Tensor, betas: tuple[float, float]
) -> None:
    """Adam's moment update with R, in place, in torch.optim.AdamW's order (lerp for the first)."""
    beta1, beta2 = betas
    low_m = low.to(exp_avg.dtype)
    exp_avg.lerp_(low_m, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low_m, low_m, value=1 - beta2)


def channel_ratio(direction: torch.Tensor, low: torch.Tensor, side: str) -> torch.Tensor:
    """``||direction_j|| / (||R_j|| + 1e-8)`` per channel, shaped to broadcast over G: per column
    of G (1 x n) on the left side, per row (m x 1) on the right. Local on any shard (a left R is
    replicated; a right R's rows are G's rows)."""
    dim = 0 if side == "left" else 1
    norm = torch.linalg.vector_norm
    return norm(direction, dim=dim, keepdim=True).div_(norm(low, dim=dim, keepdim=True).add_(NORM_EPS))


def global_norm(t: torch.Tensor, rows: RowShards) -> torch.Tensor:
    """``||t||`` of a row-sharded tensor as a 1-element tensor (one all-reduce of one number when
    sharded)."""
    return rows.allreduce(t.square().sum().reshape(1)).sqrt_()


def scaled_norm(g: torch.Tensor, phi: torch.Tensor, rows: RowShards) -> torch.Tensor:
    """``||g * phi||`` (a 0-d tensor) for a factor ``phi`` that broadcasts over the row-sharded g as a
    scalar, a row (1 x n: per column of g) or a column (m x 1: per row), without forming ``g * phi``:
    ``sum_j phi_j^2 ||g_j||^2`` over g's column or row norms, one read of g (one all-reduce of one
    number when sharded). A rule that applies ``phi`` inside a fused update needs only this norm.
    The per-row (or per-column) norms are fp32 and local; their weighted sum is taken in float64:
    a row's norm is the same on any sharding, and the sum's order, which differs between a sharded
    and an unsharded run, then no longer shows in the limiter (which feeds it into every later step).
    A float64 pass over G itself would cost a fifth of the step at the 1B shapes."""
    f64 = torch.float64
    if phi.numel() == 1 or phi.shape[1] == 1:  # a scalar, or one factor per row: G's row norms
        sq = torch.linalg.vector_norm(g, dim=1, keepdim=True).to(f64).square_()
        sq = sq.sum() * phi.reshape(()).to(f64).square() if phi.numel() == 1 else sq.mul_(phi.to(f64).square()).sum()
    else:  # one factor per column: this shard's column norms
        sq = torch.linalg.vector_norm(g, dim=0, keepdim=True).to(f64).square_().mul_(phi.to(f64).square()).sum()
    if rows.dist:
        sq = rows.allreduce(sq.reshape(1))[0]
    return sq.sqrt().to(phi.dtype)


def limiter_from_norm(norm: torch.Tensor, prev: torch.Tensor, gamma: float) -> torch.Tensor:
    """The norm-growth limiter from ``||S||`` (0-d): ``max(||S|| / (prev + 1e-8), gamma) / gamma``,
    and ``prev = ||S|| / limiter`` in place (see ``norm_growth_limiter``)."""
    limiter = torch.clamp(norm / (prev + NORM_EPS), min=gamma).div_(gamma)
    prev.copy_(norm / limiter)
    return limiter


def norm_growth_limiter(
    scaled: torch.Tensor, prev: torch.Tensor, rows: RowShards, gamma: float, norm_divisor: float = 1.0
) -> torch.Tensor:
    """The norm-growth limiter: returns ``max(||S|| / (prev + 1e-8), gamma) / gamma`` (divide S by
    it) and sets ``prev = ||S|| / limiter`` in place, ``||S||`` taken as ``||scaled|| / norm_divisor``
    (a rule whose S carries a factor the limiter must not see divides it out here).

    With prev = -1 (created or reset) the ratio is negative, the limiter 1 and prev becomes ||S||:
    the first step only records the norm, without a host sync."""
    norm = global_norm(scaled, rows)[0]
    if norm_divisor != 1.0:
        norm = norm / norm_divisor
    return limiter_from_norm(norm, prev, gamma)
