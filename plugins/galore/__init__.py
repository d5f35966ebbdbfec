"""GaLore: Adam moments kept in a low-rank projection of each selected matrix's gradient.

Weights stay full-rank. For every selected 2-D parameter (default: the weights of the LLaMA
projections; ``roles = ("A",)`` projects a factorized method's A factor instead, the composition the
benchmark paper's code ran with SLTrain), the optimizer keeps Adam moments of ``R = P^T G`` (or ``G Q^T``),
refreshes the projection every ``update_proj_gap`` steps from the current gradient (randomized range
finder by default, exact SVD as an option), and applies the update projected back times ``scale``.
Every other trainable parameter gets plain AdamW from the same optimizer
(``plugins.galore.projected_adamw.ProjectedAdamW``; the math and FSDP2 behaviour: docs/methods/galore-fira.md).

Memory: ``2 r max(m, n)`` moment elements plus ``r min(m, n)`` for the projection per projected
matrix (GaLore's published 1B figure, 4.76 GB, includes the projections), ``2 numel`` otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from registry import (
    DEFAULT_TARGETS,
    Capability,
    ConfigError,
    Method,
    OptimizerHyper,
    ParamSpec,
    check_choice,
    check_range,
    hookimpl,
)


@dataclasses.dataclass(frozen=True)
class GaLoreConfig:
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_method: str = "randomized"  # "randomized" (range finder) or "svd" (the reference's)
    power_iters: int = 2
    oversample: int = 0  # extra sketch columns of the range finder (rank + oversample, capped)
    convention: str = "paper"  # "paper" (the papers' equations) or "reference" (galore-torch 1.0's code)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        validate_projection(self, "galore")


def validate_projection(cfg: Any, section: str) -> None:
    """Range checks shared by galore and fira (errors name the key, value and allowed range)."""
    from plugins.galore.projected_adamw import CONVENTIONS
    from registry.subspace import PROJ_METHODS

    check_range(section, "rank", cfg.rank, low=1)
    check_range(section, "update_proj_gap", cfg.update_proj_gap, low=1)
    check_range(section, "scale", cfg.scale, low=0, low_inclusive=False)
    check_choice(section, "proj_method", cfg.proj_method, PROJ_METHODS)
    check_range(section, "power_iters", cfg.power_iters, low=0)
    check_range(section, "oversample", cfg.oversample, low=0)
    check_choice(section, "convention", cfg.convention, CONVENTIONS)
    if not cfg.targets:
        raise ConfigError(f"[{section}] targets = () is empty; name at least one module pattern")
    if not cfg.roles:
        raise ConfigError(f"[{section}] roles = () is empty; name at least one parameter role, e.g. 'weight'")


class GaLore(Method):
    name = "galore"
    summary = "gradient low-rank projection: Adam moments in an r-dim subspace refreshed every T steps"
    Config = GaLoreConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.PARAM_GROUPS})

    def _options(self) -> dict[str, Any]:
        c = self.config
        return {
            "proj_rank": c.rank,
            "proj_gap": c.update_proj_gap,
            "proj_scale": c.scale,
            "proj_method": c.proj_method,
            "proj_power_iters": c.power_iters,
            "proj_oversample": c.oversample,
            "proj_convention": c.convention,
        }

    def param_group_options(self, spec: ParamSpec) -> dict[str, Any] | None:
        if not self.selects(spec):
            return None
        m, n = spec.shape
        if self.config.rank > min(m, n):
            raise ConfigError(
                f"[{self.name}] rank = {self.config.rank} is out of range for {spec.name} with shape "
                f"{m} x {n}; allowed: [1, {min(m, n)}] (the smaller dimension)"
            )
        return self._options()

    def build_optimizer(self, param_groups: list[dict], hyper: OptimizerHyper) -> torch.optim.Optimizer:
        from plugins.galore.projected_adamw import ProjectedAdamW

        foreach = {"foreach": True, "fused": False, "for-loop": False}.get(hyper.implementation)
        return ProjectedAdamW(
            param_groups, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=hyper.weight_decay,
            foreach=foreach, fused=True if hyper.implementation == "fused" else None,
        )

    def state_elements(self, spec: ParamSpec) -> int:
        if not spec.trainable:
            return 0
        if self.selects(spec):
            m, n = spec.shape
            r = min(self.config.rank, m, n)
            return 2 * r * max(m, n) + r * min(m, n)
        return 2 * spec.numel


@hookimpl
def register_methods(register):
    register(GaLore)
