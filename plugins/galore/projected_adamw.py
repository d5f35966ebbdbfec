"""``ProjectedAdamW``: the GaLore/Fira rule and the AdamW rule driven by param-group options.

Not a method and not how training builds optimizers (the composition builds a ``ComposedOptimizer``
from the methods' update rules). It keeps the older group-option interface for the math tests and
benchmarks that step one matrix with given settings: a group with ``proj_rank`` is stepped by
``slimtrain.plugins.galore.ProjectionRule`` (``fira = True`` adds Fira's residual), any other group by the
AdamW rule. ``compute_projection(group, rows, side, seed)`` may be overridden to fix the projection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from slimtrain.registry.composed_optimizer import ComposedOptimizer
from slimtrain.registry.method import ParamSpec
from slimtrain.registry.subspace import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, PROJ_METHODS

__all__ = ["PROJECTION_KEYS", "PROJ_METHODS", "ProjectedAdamW"]

#: group keys that switch a group to projection
PROJECTION_KEYS = (
    "proj_rank", "proj_gap", "proj_scale", "proj_method", "proj_power_iters", "proj_oversample", "fira", "fira_gamma",
    "proj_convention", "proj_canonical_signs",
)


class ProjectedAdamW(ComposedOptimizer):
    """AdamW whose param groups may carry projection options (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        from slimtrain.plugins.adamw import AdamWRule
        from slimtrain.plugins.galore import ProjectionRule

        params = list(params)
        groups = [dict(g) for g in params] if params and isinstance(params[0], dict) else [{"params": params}]
        implementation = "fused" if fused else ("foreach" if foreach else "for-loop")
        rules: dict[str, Any] = {}
        specs: dict[torch.Tensor, ParamSpec] = {}
        for gi, g in enumerate(groups):
            g["params"] = list(g["params"])
            if "proj_rank" in g:
                name = f"projected{gi}"
                rule = ProjectionRule(
                    name, rank=g["proj_rank"], gap=g.get("proj_gap", 200), scale=g.get("proj_scale", 1.0),
                    proj_method=g.get("proj_method", "auto"),
                    power_iters=g.get("proj_power_iters", DEFAULT_POWER_ITERS),
                    oversample=g.get("proj_oversample", DEFAULT_OVERSAMPLE), fira=g.get("fira", False), gamma=g.get("fira_gamma", 1.01),
                    convention=g.get("proj_convention", "paper"),
                )
                if "proj_canonical_signs" in g:  # tests: the sign rule apart from the convention
                    rule.canonical_signs = bool(g["proj_canonical_signs"])
                rule.compute_projection = self._refresh_of(gi)
            else:
                name = "adamw"
                rule = AdamWRule(name, implementation)
            rule.implementation = implementation
            rules[name] = rule
            g["rule"] = name
            for pi, p in enumerate(g["params"]):
                specs[p] = ParamSpec(f"group{gi}.param{pi}", f"group{gi}", "weight", tuple(p.shape), is_linear=True)
        super().__init__(groups, rules=rules, specs=specs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _refresh_of(self, gi: int):
        def refresh(rows, side, seed):
            return self.compute_projection(self.param_groups[gi], rows, side, seed)

        return refresh

    def compute_projection(self, group: dict, rows, side: str, seed: int) -> torch.Tensor:
        """A fresh projection from the current gradient (the group's rule's refresh)."""
        from slimtrain.plugins.galore import ProjectionRule

        return ProjectionRule.compute_projection(self.rules[group["rule"]], rows, side, seed)
