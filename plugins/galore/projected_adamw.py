"""``ProjectedAdamW``: AdamW with optional gradient low-rank projection (GaLore) and Fira's residual.

Not a method itself: the ``galore`` and ``fira`` methods build it. A group without ``proj_rank`` is
plain AdamW (matches ``torch.optim.AdamW``); a group with it runs Adam on the projected gradient,
and with ``fira = True`` adds Fira's scaled, norm-limited residual. The equations, the paper-vs-code
differences and the FSDP2 behaviour are in docs/methods/galore-fira.md; the refreshes are in
``registry.subspace`` and the row-sharded collectives in ``registry.sharded``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from registry.sharded import OwnerRotation, RowShards
from registry.subspace import PROJ_METHODS, randomized_range, refresh_seed, std_side, svd_projection

__all__ = ["CONVENTIONS", "PROJECTION_KEYS", "PROJ_METHODS", "ProjectedAdamW"]


#: group keys that switch a group to projection (set by galore / fira via param_group_options)
PROJECTION_KEYS = (
    "proj_rank",
    "proj_gap",
    "proj_scale",
    "proj_method",
    "proj_power_iters",
    "proj_oversample",
    "fira",
    "fira_gamma",
    "proj_convention",
)
#: "paper": the papers' equations; "reference": the released galore-torch 1.0 / fira 1.0.2 code
CONVENTIONS = ("paper", "reference")
def adam_direction(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, bc1: float, bc2: float, eps: float, reference: bool
) -> torch.Tensor:
    """The bias-corrected Adam direction of the projected gradient, in fp32.

    Paper (torch.optim.AdamW's order): ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``. Reference
    (galore-torch / fira): ``m / (sqrt(v) + eps)`` times ``sqrt(bc2) / bc1``, i.e. eps added before
    the bias correction, which makes it ``eps * sqrt(bc2)`` in the paper's terms: 1.5e-2 relative
    on GaLore's first step (docs/methods/galore-fira.md). Few kernels on purpose: the step's
    host-side cost grows with the kernel count (benchmarks/optimizer_overhead.py).
    """
    if reference:
        return exp_avg.float().div(exp_avg_sq.float().sqrt().add_(eps)).mul_(math.sqrt(bc2) / bc1)
    denom = exp_avg_sq.float().sqrt().div_(math.sqrt(bc2)).add_(eps)
    return exp_avg.float().div(denom).div_(bc1)


# --------------------------------------------------------------------------------------------------
class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW whose param groups may carry projection options (see the module docstring)."""

    #: the Adam moments this optimizer keeps (momentum_reset zeroes these, never ``proj``)
    moment_keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
    #: other state a restart puts back to its initial value (Fira's limiter starts unlimited again,
    #: as when the paper's code re-creates the optimizer)
    restart_values: dict[str, float] = {"fira_prev": -1.0}

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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults)
        self._svd_owners = OwnerRotation()  # exact-SVD refreshes under FSDP2
        for group in self.param_groups:
            if "proj_rank" in group:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(f"projected param groups take 2-D parameters only; got shape {tuple(p.shape)}")
                    if not 0 < group["proj_rank"] <= min(p.shape):
                        raise ValueError(f"proj_rank {group['proj_rank']} out of range for shape {tuple(p.shape)}")

    # -- plain AdamW groups ---------------------------------------------------------------------
    def _plain_step(self, group: dict) -> None:
        from torch.optim.adam import adam

        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                # the fused/capturable kernels read the step on the parameter's device (as torch's Adam)
                on_device = group.get("fused") or group.get("capturable")
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if on_device else None)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=group.get("foreach"), fused=group.get("fused"), decoupled_weight_decay=True,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )

    # -- projected groups -----------------------------------------------------------------------
    def _wrap_like(self, p: torch.Tensor, local: torch.Tensor, rows: RowShards, sharded: bool) -> torch.Tensor:
        """State tensor: plain, or a DTensor (Shard(0) rows like G, or Replicate()) under FSDP2."""
        if not rows.dist:
            return local
        from torch.distributed.tensor import DTensor, Replicate

        if sharded:
            k = local.shape[1]
            return DTensor.from_local(local, rows.mesh, rows.placements, shape=(rows.shape[0], k), stride=(k, 1))
        return DTensor.from_local(local, rows.mesh, [Replicate()], run_check=False)

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        from registry.tensors import local_tensor

        return local_tensor(t)

    def _refresh_due(self, group: dict, p: torch.Tensor) -> bool:
        state = self.state[p]
        return "proj" not in state or int(state["step"].item()) % int(group["proj_gap"]) == 0

    def _refresh_svd_distributed(self, jobs: list[tuple[dict, torch.Tensor, RowShards]]) -> dict[int, torch.Tensor]:
        """Exact SVD refreshes under FSDP2, one owner rank per matrix (``registry.sharded.OwnerRotation``)."""
        def job(group: dict, p: torch.Tensor, rows: RowShards):
            m, n = rows.shape
            r = int(group["proj_rank"])
            side = std_side(rows.shape)
            shape = (m, r) if side == "left" else (r, n)
            return rows, p.grad.full_tensor, lambda full: svd_projection(full, r, side), shape

        results = self._svd_owners.compute([job(*j) for j in jobs])
        return {id(p): out for (_, p, _), out in zip(jobs, results)}

    def compute_projection(self, group: dict, rows: RowShards, side: str, seed: int) -> torch.Tensor:
        """A fresh projection (P, m x r, for the left side; Q, r x n, for the right) from the
        current gradient, identical on every rank. Tests override it to fix the projection."""
        rank = int(group["proj_rank"])
        if group.get("proj_method", "randomized") == "svd":
            return svd_projection(rows.gather_rows(rows.local), rank, side)
        return randomized_range(
            rows, rank, side,
            power_iters=int(group.get("proj_power_iters", 2)),
            oversample=int(group.get("proj_oversample", 0)),
            seed=seed,
        )

    def _projected_step(self, gi: int, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        rank = int(group["proj_rank"])
        scale = float(group["proj_scale"])
        method = group.get("proj_method", "randomized")
        fira = bool(group.get("fira", False))
        gamma = float(group.get("fira_gamma", 1.01))
        reference = group.get("proj_convention", "paper") == "reference"

        live = [(pi, p) for pi, p in enumerate(group["params"]) if p.grad is not None]
        rows_of = {id(p): RowShards(p.grad) for _, p in live}
        for _, p in live:
            if not self.state[p]:
                self.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
        svd_jobs = [
            (group, p, rows_of[id(p)])
            for _, p in live
            if method == "svd" and rows_of[id(p)].dist and self._refresh_due(group, p)
        ]
        distributed_svd = self._refresh_svd_distributed(svd_jobs)

        for pi, p in live:
            state = self.state[p]
            rows = rows_of[id(p)]
            side = std_side(rows.shape)
            g = rows.local
            step_before = int(state["step"].item())
            if "proj" not in state or step_before % int(group["proj_gap"]) == 0:
                if id(p) in distributed_svd:
                    proj = distributed_svd[id(p)]
                else:
                    proj = self.compute_projection(group, rows, side, refresh_seed(gi, pi, step_before))
                if "proj" in state:
                    self._local(state["proj"]).copy_(proj)
                else:
                    state["proj"] = self._wrap_like(p, proj, rows, sharded=False)
            proj = self._local(state["proj"]).float()

            if side == "left":  # P: m x r; R = P^T G (r x n), replicated
                p_rows = rows.my_rows(proj)
                low = rows.allreduce(p_rows.T @ g)
            else:  # Q: r x n; R = G Q^T (m x r), row-sharded like G
                low = g @ proj.T
            if "exp_avg" not in state:
                sharded = side == "right"
                state["exp_avg"] = self._wrap_like(p, torch.zeros_like(low, dtype=p.dtype), rows, sharded)
                state["exp_avg_sq"] = self._wrap_like(p, torch.zeros_like(low, dtype=p.dtype), rows, sharded)
                if fira:
                    state["fira_prev"] = torch.tensor(-1.0, dtype=torch.float32, device=g.device)
            exp_avg = self._local(state["exp_avg"])
            exp_avg_sq = self._local(state["exp_avg_sq"])

            state["step"] += 1
            t = step_before + 1
            low_m = low.to(exp_avg.dtype)
            exp_avg.lerp_(low_m, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low_m, low_m, value=1 - beta2)
            bc1 = 1 - beta1**t
            bc2 = 1 - beta2**t
            direction = adam_direction(exp_avg, exp_avg_sq, bc1, bc2, eps, reference)
            update = p_rows @ direction if side == "left" else direction @ proj

            p_local = self._local(p.data) if rows.dist else p.data
            if wd != 0 and not reference:
                p_local.mul_(1 - lr * wd)
            p_local.add_(update.to(p_local.dtype), alpha=-lr * scale)
            if fira:
                dim = 0 if side == "left" else 1  # per column (left) / per row (right)
                norm = torch.linalg.vector_norm
                phi = norm(direction, dim=dim, keepdim=True).div_(norm(low, dim=dim, keepdim=True).add_(1e-8))
                back_low = p_rows @ low if side == "left" else low @ proj
                # the paper's residual G - P P^T G; the released code subtracts scale * P P^T G
                scaled = g.sub(back_low, alpha=scale if reference else 1.0).mul_(phi)
                c_t = math.sqrt(bc2) / bc1
                norm_ref = rows.allreduce(scaled.square().sum().reshape(1))[0].sqrt_().div_(c_t)
                prev = state["fira_prev"]
                # limiter = max(||S|| / prev, gamma) / gamma. The first step after creation or a
                # reset has prev = -1: the ratio is <= 0, the clamp gives gamma and the limiter 1,
                # so that step is not limited, without a host sync.
                limiter = torch.clamp(norm_ref / (prev + 1e-8), min=gamma).div_(gamma)
                prev.copy_(norm_ref / limiter)
                p_local.addcdiv_(scaled.to(p_local.dtype), limiter, value=-lr)
            if wd != 0 and reference:  # the released code decays the already-updated weight
                p_local.add_(p_local, alpha=-lr * wd)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            if "proj_rank" in group:
                self._projected_step(gi, group)
            else:
                self._plain_step(group)
        return loss
