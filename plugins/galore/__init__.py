"""GaLore: Adam moments kept in a low-rank projection of each selected matrix's gradient.

Weights stay full-rank. For every selected 2-D parameter (default: the weights of the LLaMA
projections; ``roles = ("A",)`` projects a factorized method's A factor instead, the composition the
benchmark paper's code ran with SLTrain), the rule keeps Adam moments of ``R = P^T G`` (or ``G Q^T``),
refreshes the projection every ``update_proj_gap`` steps from the current gradient (randomized range
finder by default, exact SVD as an option), and applies the update projected back times ``scale``.
Every other trainable parameter goes to the default AdamW rule of the same optimizer. The math and
the FSDP2 behaviour are in docs/methods/galore-fira.md; ``ProjectionRule`` below serves Fira too.

Gradient accumulation with per-layer updates (``accumulation_specs`` / ``accumulate``): the rule keeps
``R = P^T G`` (or ``G Q^T``), r x n, summed over the micro-batches (the projection is linear, so this
is the plain accumulated step's R up to fp32 summation order); a refresh due in the step is computed
from the FIRST micro-batch's gradient (the plain step's from the sum; the measured effect is in
docs/methods/memory-layers.md). Fira's residual needs the full gradient: with ``accumulation =
"projected"`` it is the last micro-batch's residual times k (an estimate), with ``"full"`` (Fira's
default) the full gradient is accumulated as for any rule.

Memory: ``2 r max(m, n)`` moment elements plus ``r min(m, n)`` for the projection per projected
matrix (GaLore's published 1B figure, 4.76 GB, includes the projections), ``2 numel`` otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from slimtrain.registry import (
    DEFAULT_TARGETS,
    Capability,
    ConfigError,
    Method,
    ParamSpec,
    check_choice,
    check_range,
    hookimpl,
)
from slimtrain.registry.projected_moments import (
    ACCUMULATED,
    basis_of,
    channel_ratio,
    check_rank,
    limiter_state_spec,
    norm_growth_limiter,
    project,
    fold_projected,
    project_back,
    projected_accumulation_specs,
    projected_state_specs,
    update_moments,
)
from slimtrain.registry.sharded import OwnerRanks, RowShards
from slimtrain.registry.subspace import (
    DEFAULT_OVERSAMPLE,
    DEFAULT_POWER_ITERS,
    randomized_range,
    refresh_seed,
    resolve_proj_method,
    std_side,
    svd_projection,
)
from slimtrain.registry.tensors import local_tensor
from slimtrain.registry.update_rule import RuleParam, StateSpec, StepInfo, UpdateRule


@dataclasses.dataclass(frozen=True)
class GaLoreConfig:
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_method: str = "auto"  # "auto" (svd under convention "reference", else randomized), "randomized", "svd"
    # the randomized refresh's power iterations and extra sketch columns (rank + oversample, capped);
    # None: the defaults (registry/subspace.py, DEFAULT_POWER_ITERS / DEFAULT_OVERSAMPLE). Refused
    # under convention "reference", whose refresh is the package's exact SVD
    power_iters: int | None = None
    oversample: int | None = None
    convention: str = "paper"  # "paper" (the papers' equations) or "reference" (galore-torch 1.0's code)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        validate_projection(self, "galore")


def validate_projection(cfg: Any, section: str) -> None:
    """Range checks shared by galore and fira (errors name the key, value and allowed range)."""
    from slimtrain.registry.subspace import PROJ_METHODS

    check_range(section, "rank", cfg.rank, low=1)
    check_range(section, "update_proj_gap", cfg.update_proj_gap, low=1)
    check_range(section, "scale", cfg.scale, low=0, low_inclusive=False)
    check_choice(section, "proj_method", cfg.proj_method, PROJ_METHODS)
    check_range(section, "power_iters", cfg.power_iters, low=0)
    check_range(section, "oversample", cfg.oversample, low=0)
    check_choice(section, "convention", cfg.convention, CONVENTIONS)
    if cfg.convention == "reference":
        check_reference_refresh(cfg, section)
    if not cfg.targets:
        raise ConfigError(f"[{section}] targets = () is empty; name at least one module pattern")
    if not cfg.roles:
        raise ConfigError(f"[{section}] roles = () is empty; name at least one parameter role, e.g. 'weight'")


def check_reference_refresh(cfg: Any, section: str) -> None:
    """Under ``convention = "reference"`` the refresh is the released package's exact SVD
    (``torch.linalg.svd`` with its own signs): a setting only the randomized refresh reads would be
    ignored, so it is refused, naming the method, the key and the value."""
    package = "galore-torch 1.0" if section == "galore" else "fira 1.0.2"
    why = f"contradicts convention = 'reference': the released {package} refreshes by its exact SVD"
    if cfg.proj_method == "randomized":
        raise ConfigError(f"[{section}] proj_method = 'randomized' {why}; leave proj_method at 'auto' or set 'svd'")
    for key in ("power_iters", "oversample"):
        value = getattr(cfg, key)
        if value is not None:
            raise ConfigError(
                f"[{section}] {key} = {value!r} {why} (torch.linalg.svd), which has no {key}; leave {key} unset"
            )


#: "paper": the papers' equations; "reference": the released galore-torch 1.0 / fira 1.0.2 code
#: (docs/methods/galore-fira.md lists the three differences and their measured sizes)
CONVENTIONS = ("paper", "reference")


# -- the step's pieces, each on this rank's (fp32) blocks -----------------------------------------
def adam_direction(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, low: torch.Tensor, betas: tuple[float, float], eps: float, t: int,
    reference: bool = False,
) -> torch.Tensor:
    """Update the moments with the projected gradient ``low`` (in place) and return Adam's
    direction ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`` in fp32, in torch.optim.AdamW's order and
    with as few kernels as it allows (the step's host-side cost grows with the kernel count).
    ``reference``: the released code's ``m / (sqrt(v) + eps) * sqrt(bc2) / bc1`` (eps before the
    bias correction)."""
    beta1, beta2 = betas
    update_moments(exp_avg, exp_avg_sq, low, betas)
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    if reference:
        return exp_avg.float().div(exp_avg_sq.float().sqrt().add_(eps)).mul_(math.sqrt(bc2) / bc1)
    denom = exp_avg_sq.float().sqrt().div_(math.sqrt(bc2)).add_(eps)
    return exp_avg.float().div(denom).div_(bc1)


def apply_weight_decay(p_local: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay, ``W <- W (1 - lr wd)``, before the update (as torch's AdamW)."""
    if weight_decay != 0:
        p_local.mul_(1 - lr * weight_decay)


def fira_residual(
    g: torch.Tensor, low: torch.Tensor, back_low: torch.Tensor, direction: torch.Tensor, side: str,
    subtract: float = 1.0,
) -> torch.Tensor:
    """Fira's scaled residual ``S = (G - P P^T G) * phi`` with ``phi = ||Adam(R)|| / ||R||`` per
    column (left projection) or per row (right). ``subtract``: the released code subtracts
    ``alpha P P^T G`` (not a residual for alpha != 1); the paper subtracts ``P P^T G``."""
    return g.sub(back_low, alpha=subtract).mul_(channel_ratio(direction, low, side))


def fira_limiter(
    scaled: torch.Tensor, prev: torch.Tensor, rows: RowShards, betas: tuple[float, float], t: int, gamma: float,
    reference: bool = False,
) -> torch.Tensor:
    """The norm-growth limiter ``max(||S|| / prev, gamma) / gamma`` (updates ``prev`` in place).

    Paper (default): ``S`` is the scaled residual as applied (built from the bias-corrected Adam
    direction), compared with the previous step's limited ``||S||``, the Fira paper's statement.
    ``reference``: fira 1.0.2 limits the residual built from ``m / (sqrt(v) + eps)`` before the
    bias-correction factor ``c_t = sqrt(1 - b2^t) / (1 - b1^t)`` (folded into its step size); our
    reference direction carries c_t, so its norm is divided by c_t to compare the package's quantity.

    The first step after creation or a reset has prev = -1: the ratio is <= 0, the clamp gives gamma
    and the limiter 1, so that step is not limited, without a host sync."""
    beta1, beta2 = betas
    c_t = math.sqrt(1 - beta2**t) / (1 - beta1**t) if reference else 1.0
    return norm_growth_limiter(scaled, prev, rows, gamma, norm_divisor=c_t)


class ProjectionRule(UpdateRule):
    """GaLore's step (and, with ``fira``, Fira's residual) on each selected matrix.

    FSDP2 patterns: the left projection ``R = P^T G`` is an all-reduce of per-shard products
    (``RowShards.allreduce``), the right one ``G Q^T`` is local to the row shard; the randomized
    refresh never gathers the gradient (all-reduces of n x l products, gathers of thin m x l
    matrices); the exact-SVD refresh runs on one owner rank per matrix (``OwnerRanks``).
    """

    def __init__(
        self, method: str, *, rank: int, gap: int, scale: float, proj_method: str = "auto",
        power_iters: int | None = None, oversample: int | None = None, fira: bool = False,
        gamma: float = 1.01, convention: str = "paper", accumulation: str = "projected",
    ):
        self.method = method
        self.rank, self.gap, self.scale = int(rank), int(gap), float(scale)
        self.reference = convention == "reference"
        self.proj_method = resolve_proj_method(proj_method, self.reference)
        self.power_iters = DEFAULT_POWER_ITERS if power_iters is None else int(power_iters)
        self.oversample = DEFAULT_OVERSAMPLE if oversample is None else int(oversample)
        self.fira, self.gamma = bool(fira), float(gamma)
        # the released packages keep torch.linalg.svd's signs; the paper convention fixes them so the
        # randomized and exact refreshes agree (docs/methods/galore-fira.md, Signs)
        self.canonical_signs = not self.reference
        self.owners = OwnerRanks()
        self.accumulation = accumulation  # "projected": r x n buffers; "full": the gradient (Fira's residual)

    # -- declarations ---------------------------------------------------------------------------
    def check(self, spec: ParamSpec) -> None:
        super().check(spec)
        check_rank(self.method, self.rank, spec)

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        specs = projected_state_specs(spec.shape, self.rank)
        if self.fira:
            specs.append(limiter_state_spec("fira_prev"))
        return specs

    # -- gradient accumulation (per-layer updates) ------------------------------------------------
    def accumulation_specs(self, spec: ParamSpec) -> list[StateSpec] | None:
        if self.fira and self.accumulation == "full":
            return None
        return projected_accumulation_specs(spec.shape, self.rank)

    def accumulate(self, item: RuleParam, buffers: dict[str, torch.Tensor], micro: int, info: StepInfo) -> None:
        rows = RowShards(item.grad)
        side = std_side(rows.shape)
        proj_state = local_tensor(item.state["proj"])
        step_before = int(item.state["step"].item())
        if micro == 0 and step_before % self.gap == 0:  # the refresh's choice: the first micro-batch
            svd = None
            if self.proj_method == "svd" and rows.dist:
                svd = self._distributed_svds([(item, rows)]).get(id(item))
            proj_state.copy_(svd if svd is not None else self.compute_projection(
                rows, side, refresh_seed(item.group_index, item.index, step_before)))
        fold_projected(buffers, rows, proj_state, side)

    # -- refresh --------------------------------------------------------------------------------
    def compute_projection(self, rows: RowShards, side: str, seed: int) -> torch.Tensor:
        """A fresh projection (P, m x r, left; Q, r x n, right) from the current gradient, identical
        on every rank. Tests override it to fix the projection."""
        if self.proj_method == "svd":
            return svd_projection(rows.gather_rows(rows.local), self.rank, side, canonical=self.canonical_signs)
        return randomized_range(
            rows, self.rank, side, power_iters=self.power_iters, oversample=self.oversample, seed=seed,
        )

    def _distributed_svds(self, jobs: list[tuple[RuleParam, RowShards]]) -> dict[int, torch.Tensor]:
        if not jobs:
            return {}
        rows0 = jobs[0][1]

        def shape(job):
            m, n = job[1].shape
            return (m, self.rank) if std_side((m, n)) == "left" else (self.rank, n)

        results = self.owners.run(
            jobs,
            gather=lambda job: job[0].grad.full_tensor(),
            compute=lambda job, full: svd_projection(
                full, self.rank, std_side(job[1].shape), canonical=self.canonical_signs
            ),
            result_shape=shape, group=rows0.group, device=rows0.local.device,
        )
        return {id(job[0]): out for job, out in zip(jobs, results)}

    # -- step -----------------------------------------------------------------------------------
    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        rows_of = [RowShards(p.grad) for p in params]
        before = [int(p.state["step"].item()) for p in params]
        due = [b % self.gap == 0 and p.accumulated is None for p, b in zip(params, before)]
        svds = self._distributed_svds(
            [(p, rows) for p, rows, d in zip(params, rows_of, due) if d and self.proj_method == "svd" and rows.dist]
        )
        for p, rows, step_before, refresh in zip(params, rows_of, before, due):
            self._step_one(p, rows, step_before, refresh, svds.get(id(p)), info)

    def _step_one(
        self, p: RuleParam, rows: RowShards, step_before: int, refresh: bool, svd: torch.Tensor | None, info: StepInfo
    ) -> None:
        state = p.state
        side = std_side(rows.shape)
        g = rows.local
        proj_state = local_tensor(state["proj"])
        if refresh:
            fresh = svd if svd is not None else self.compute_projection(
                rows, side, refresh_seed(p.group_index, p.index, step_before)
            )
            proj_state.copy_(fresh)
        if p.accumulated is None:
            low, basis = project(rows, proj_state.float(), side)
        else:  # R summed over the micro-batches (accumulate); G is the last micro-batch's alone
            low, basis = p.accumulated[ACCUMULATED], basis_of(rows, proj_state.float(), side)
        state["step"] += 1
        t = step_before + 1
        direction = adam_direction(
            local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]), low, info.betas, info.eps, t, self.reference
        )
        update = project_back(direction, basis, side)

        p_local = local_tensor(p.param.data)
        if not self.reference:
            apply_weight_decay(p_local, info.lr, info.weight_decay)
        p_local.add_(update.to(p_local.dtype), alpha=-info.lr * self.scale)
        if self.fira:
            if p.accumulated is None:
                back_low = project_back(low, basis, side)
            else:  # the residual of the last micro-batch, times k: an estimate of the step's
                g = g * p.micro_batches
                back_low = project_back(project(rows, proj_state.float(), side)[0], basis, side).mul_(p.micro_batches)
            scaled = fira_residual(g, low, back_low, direction, side, self.scale if self.reference else 1.0)
            limiter = fira_limiter(scaled, state["fira_prev"], rows, info.betas, t, self.gamma, self.reference)
            p_local.addcdiv_(scaled.to(p_local.dtype), limiter, value=-info.lr)
        if self.reference:  # the released code decays the already-updated weight
            apply_weight_decay(p_local, info.lr, info.weight_decay)


class GaLore(Method):
    name = "galore"
    summary = "gradient low-rank projection: Adam moments in an r-dim subspace refreshed every T steps"
    Config = GaLoreConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def _rule_options(self) -> dict[str, Any]:
        c = self.config
        return dict(
            rank=c.rank, gap=c.update_proj_gap, scale=c.scale, proj_method=c.proj_method,
            power_iters=c.power_iters, oversample=c.oversample, convention=c.convention,
        )

    def update_rule(self) -> ProjectionRule:
        return ProjectionRule(self.name, **self._rule_options())


@hookimpl
def register_methods(register):
    register(GaLore)
