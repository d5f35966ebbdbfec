"""Fira: GaLore plus the gradient's residual outside the subspace, scaled and norm-limited.

``update = scale * P Adam(R) + S`` with ``S = (G - P P^T G) * phi``, ``phi = ||Adam(R)|| / ||R||`` per
column (left projection) or per row (right projection), and S limited so its norm grows by at most
``gamma`` (1.01) per step. The rule is galore's ``ProjectionRule`` with ``fira = True`` (one more
state scalar, the limiter's previous norm, re-initialized to -1 by a momentum reset). The math, its
one deliberate deviation from the reference code and the FSDP2 behaviour are in
docs/methods/galore-fira.md. Defaults follow the paper: rank 128, gap 200, scale (the paper's
alpha) 0.25 (0.0625 at 1B).
"""

from __future__ import annotations

import dataclasses

from slimtrain.registry import DEFAULT_TARGETS, check_choice, check_range, hookimpl
from slimtrain.plugins.galore import GaLore, ProjectionRule, validate_projection

ACCUMULATIONS = ("full", "projected")


@dataclasses.dataclass(frozen=True)
class FiraConfig:
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25  # the paper's alpha
    gamma: float = 1.01  # norm-growth limiter
    proj_method: str = "auto"  # "auto": svd under convention "reference", else randomized
    power_iters: int | None = None  # None: DEFAULT_POWER_ITERS; refused under convention "reference"
    oversample: int | None = None  # None: DEFAULT_OVERSAMPLE; refused under convention "reference"
    convention: str = "paper"  # "paper" (the paper's equations) or "reference" (fira 1.0.2's code)
    #: per-layer updates with gradient accumulation: "full" (the gradient accumulated, the plain
    #: accumulated step) or "projected" (r x n buffers; the residual is the last micro-batch's times k)
    accumulation: str = "full"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        validate_projection(self, "fira")
        check_range("fira", "gamma", self.gamma, low=1.0)
        check_choice("fira", "accumulation", self.accumulation, ACCUMULATIONS)


class Fira(GaLore):
    name = "fira"
    summary = "GaLore plus the norm-scaled residual outside the subspace, with a norm-growth limiter"
    Config = FiraConfig

    def update_rule(self) -> ProjectionRule:
        return ProjectionRule(self.name, **self._rule_options(), fira=True, gamma=self.config.gamma,
                              accumulation=self.config.accumulation)


@hookimpl
def register_methods(register):
    register(Fira)
