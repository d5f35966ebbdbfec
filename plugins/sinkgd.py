"""SinkGD: stateless SGD on the gradient made row- and column-normalized by alternating passes.

Scetbon, Ma, Gong, Meeds, "Gradient Multi-Normalization for Stateless and Scalable LLM Training",
arXiv 2502.06742 (no code released; the test states the paper's algorithm independently). For each
selected m x n matrix with gradient G, SR-Sinkhorn with L iterations:

    X <- G;  repeat L times:  X <- sqrt(n) Q(X)^-1 X   (every row to l2 norm sqrt(n))
                              X <- sqrt(m) X R(X)^-1   (every column to l2 norm sqrt(m))
    W <- W - lr X

Q(X), R(X): the diagonals of X's row and column l2 norms. Dividing by ``norm / sqrt(n)`` is dividing by
the row's root mean square, which is how it is computed here (the same number), with a 1e-8 floor on
each RMS (a zero row or column; the paper has none). The paper keeps no moments, no eps and no weight
decay; here the trainer's decoupled weight decay ``W <- W (1 - lr wd)`` applies before the step as for
every rule (the recipes set it to 0). The embedding, the output head and the norms go to the default
AdamW rule (``targets`` = the hidden projections), as in the paper's LLaMA runs. ``lr_ratio``
multiplies the trainer's LR for SinkGD's matrices only.

FSDP2: a row's RMS is local to the row shard; a column's is one all-reduce of n numbers per
iteration (``RowShards.allreduce``). Memory: no state at all.
"""

from __future__ import annotations

import dataclasses

import torch

from slimtrain.registry import DEFAULT_TARGETS, Capability, ConfigError, Method, ParamSpec, check_range, hookimpl
from slimtrain.registry.sharded import RowShards
from slimtrain.registry.tensors import local_tensor
from slimtrain.registry.update_rule import RuleParam, StateSpec, StepInfo, UpdateRule

RMS_FLOOR = 1e-8


@dataclasses.dataclass(frozen=True)
class SinkGDConfig:
    iterations: int = 5  # L, the SR-Sinkhorn passes (row then column) per step
    lr_ratio: float = 1.0  # SinkGD matrices step with lr_ratio x the trainer's LR
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        check_range("sinkgd", "iterations", self.iterations, low=1, high=100)
        check_range("sinkgd", "lr_ratio", self.lr_ratio, low=0, low_inclusive=False)
        if not self.targets:
            raise ConfigError("[sinkgd] targets = () is empty; name at least one module pattern")
        if not self.roles:
            raise ConfigError("[sinkgd] roles = () is empty; name at least one parameter role, e.g. 'weight'")


def sinkhorn_scalings(g: torch.Tensor, iterations: int, rows: RowShards | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The diagonal scalings (r: rows x 1, c: 1 x n) with ``X = r * G * c`` after ``iterations``
    alternating row / column RMS normalizations of G (this rank's rows of an m x n matrix; ``rows``
    given when the rows are spread over ranks: the column sums are then one all-reduce of n numbers
    per iteration). X is never formed inside the loop: ``G^2`` is squared once and each pass is one
    matrix-vector product with it (row sums of ``(r G c)^2 = r^2 (G^2 c^2)``, column sums
    ``c^2 (r^2 G^2)``), so the step reads G's size about 2L + 3 times, about AdamW's traffic."""
    m, n = rows.shape if rows is not None else g.shape
    g2 = g.square()
    c = g.new_ones(n)
    r = g.new_ones(g.shape[0])
    for _ in range(iterations):
        row_rms = (r * (g2 @ c.square()).div_(n).sqrt_()).clamp_min_(RMS_FLOOR)
        r = r / row_rms
        col = r.square() @ g2
        if rows is not None:
            col = rows.allreduce(col)
        col_rms = (c * col.div_(m).sqrt_()).clamp_min_(RMS_FLOOR)
        c = c / col_rms
    return r.unsqueeze(1), c.unsqueeze(0)


def sr_sinkhorn(g: torch.Tensor, iterations: int, rows: RowShards | None = None) -> torch.Tensor:
    """``iterations`` alternating row / column RMS normalizations of ``g`` (the SR-Sinkhorn output)."""
    r, c = sinkhorn_scalings(g, iterations, rows)
    return r * g * c


class SinkGDRule(UpdateRule):
    """SinkGD's step: no state; column statistics all-reduced under FSDP2."""

    def __init__(self, method: str, *, iterations: int, lr_ratio: float):
        self.method = method
        self.iterations, self.lr_ratio = int(iterations), float(lr_ratio)

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        return []

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        lr = info.lr * self.lr_ratio
        for p in params:
            rows = RowShards(p.grad)
            g = rows.local
            r, c = sinkhorn_scalings(g, self.iterations, rows)
            p_local = local_tensor(p.param.data)
            if info.weight_decay:
                p_local.mul_(1 - lr * info.weight_decay)
            if p_local.dtype == torch.float32:
                p_local.addcmul_(g * r, c, value=-lr)  # W -= lr r G c, X never stored on its own
            else:
                p_local.add_((g * r * c).to(p_local.dtype), alpha=-lr)


class SinkGD(Method):
    name = "sinkgd"
    summary = "stateless SGD on the gradient normalized by alternating row/column passes (SR-Sinkhorn)"
    Config = SinkGDConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def selects(self, spec: ParamSpec) -> bool:
        return self.selects_any_shape(spec)

    def update_rule(self) -> SinkGDRule:
        return SinkGDRule(self.name, iterations=self.config.iterations, lr_ratio=self.config.lr_ratio)


@hookimpl
def register_methods(register):
    register(SinkGD)
