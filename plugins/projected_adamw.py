"""``ProjectedAdamW``: AdamW with optional gradient low-rank projection (GaLore) and Fira's residual.

Not a method itself: the ``galore`` and ``fira`` methods build it. One optimizer serves every
parameter; what a parameter gets is decided by the options of its param group:

* a group without ``proj_rank`` is plain AdamW (torch's functional ``adam`` with decoupled weight
  decay, so it matches ``torch.optim.AdamW`` exactly);
* a group with ``proj_rank`` (2-D parameters only) runs Adam on the projected gradient and applies
  the update projected back and multiplied by ``proj_scale``; with ``fira = True`` it also applies
  Fira's scaled residual.

Math (G is the m x n gradient, r the rank, step t 1-based, Adam(.) the bias-corrected AdamW direction
``m_hat / (sqrt(v_hat) + eps)`` of torch.optim.AdamW):

* side, the reference's "std" rule: if m < n the left singular vectors P (m x r), R = P^T G (r x n),
  back-projection P N; otherwise the right ones, stored as Q (r x n), R = G Q^T (m x r), back-projection
  N Q. Moments live in R's shape: 2 r max(m, n) elements, plus r min(m, n) for the projection.
* refresh: when the step count before this step is a multiple of ``proj_gap`` (0, T, 2T, ...), from
  the current gradient. Moments are not reset or rotated when P changes (as the reference).
* GaLore update: ``W <- W (1 - lr wd) - lr * scale * back(Adam(R))``.
* Fira: residual ``E = G - back(R)`` (the part of G outside the subspace; note the reference
  subtracts ``scale * back(R)``, which is not a residual for scale != 1 and breaks "full rank equals
  GaLore": we follow the paper), scaled by ``phi = ||Adam(R)|| / (||R|| + 1e-8)`` per column (left
  side) or per row (right side), the dimension R shares with G. The norm-growth limiter divides the
  scaled residual S by ``max(||S|| / prev, gamma) / gamma`` and stores ``prev`` as the limited norm;
  the first step (``fira_prev < 0``) is not limited. The reference evaluates the limiter on the
  update *before* Adam's bias-correction factor ``c_t = sqrt(1 - b2^t) / (1 - b1^t)`` (it folds c_t into
  the step size); we compute Adam(R) bias-corrected, so we compare ``||S|| / c_t`` to ``prev``, which
  reproduces the reference's limiter (up to where eps enters) rather than one that bites whenever c_t
  grows. Update: ``W <- W (1 - lr wd) - lr * (scale * back(Adam(R)) + S)``.

Refresh (``proj_method``):

* ``"randomized"`` (default): randomized subspace iteration. A Gaussian sketch (seeded from the
  parameter's position and the step, so every rank draws the same) of width l = r +
  ``proj_oversample``, ``proj_power_iters`` power iterations (each re-based by an LU factor, cheaper
  than a QR and enough to keep the columns apart),
  then the basis is rotated onto the sketch's own singular vectors (QR of the d x l sketch, SVD of the
  l x l triangle) so its columns are ordered by estimated singular value, as the SVD's are (Adam is
  not rotation-invariant, so the order and alignment of the basis matter), and the top r are kept.
  All fp32. For a gradient of rank <= l it returns the exact column/row space.
* ``"svd"``: ``torch.linalg.svd`` of the whole fp32 gradient (the reference's method).

FSDP2 (DTensor parameters and gradients sharded ``Shard(0)`` on a 1-D mesh). What a refresh gathers
and computes on each rank, and why:

* ``randomized``: the gradient is never gathered. Every product with G is done on the local row
  shard G_k, and only thin matrices cross ranks: right side (m >= n): ``G^T X = sum_k G_k^T X_k`` is an
  all-reduce of n x l (1 + power_iters of them), nothing is gathered; left side (m < n): the sketch
  ``G Z`` is computed row-sharded and all-gathered (m x l) for its LU / QR, ``G^T Y`` is an all-reduce
  of n x l. Each rank does 1/world of the big matmul FLOPs; only the LU and QR factorizations of
  (m or n) x l matrices and the l x l SVD are repeated on every rank (O(d l^2), small against the
  O(m n l) products). Chosen because it splits the expensive part by data and needs no cross-matrix
  scheduling.
* ``svd``: the full SVD needs the whole matrix, so refreshes are spread *by matrix*: the parameters
  refreshed in a step are taken in chunks of world-size, every rank all-gathers the chunk's gradients
  (the collective needs every rank), rank j computes the SVD of the chunk's j-th matrix only, and each
  projection is broadcast from its owner. Each rank computes 1/world of the SVDs instead of all of them.

State per projected parameter, tensors only (torch.distributed.checkpoint saves it; a projector
object could not be saved): ``step`` (float32 scalar, like torch's AdamW), ``exp_avg``,
``exp_avg_sq`` (projected shape), ``proj`` (P or Q, fp32) and, for Fira, ``fira_prev``. Under FSDP2
the right-side moments are ``Shard(0)`` DTensors (their rows follow G's rows) and the left-side
moments and the projection are ``Replicate()`` DTensors (identical on every rank), so
``get_optimizer_state_dict`` / DCP save and reshard them like any other state.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from typing import Any

import torch


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
)
PROJ_METHODS = ("randomized", "svd")


def std_side(shape: tuple[int, ...]) -> str:
    """The reference's "std" rule: project on the smaller dimension (left when m < n)."""
    m, n = shape
    return "left" if m < n else "right"


# --------------------------------------------------------------------------------------------------
# Row-sharded linear algebra: the same code serves a plain tensor (one "shard") and a Shard(0) DTensor.
# --------------------------------------------------------------------------------------------------
class _Rows:
    """A gradient as this rank's row block plus the collectives needed to combine blocks."""

    def __init__(self, grad: torch.Tensor):
        from registry.tensors import is_dtensor

        self.shape = tuple(grad.shape)
        self.dist = False
        if is_dtensor(grad):
            from torch.distributed.tensor import Shard

            mesh, placements = grad.device_mesh, grad.placements
            if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
                raise NotImplementedError(
                    f"ProjectedAdamW supports plain tensors and Shard(0) DTensors on a 1-D mesh "
                    f"(FSDP2); got placements {placements} on a {mesh.ndim}-D mesh"
                )
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local_shape, offset = compute_local_shape_and_global_offset(grad.shape, mesh, placements)
            self.dist = True
            self.mesh = mesh
            self.placements = placements
            self.group = mesh.get_group(0)
            self.row0 = int(offset[0])
            self.rows = int(local_shape[0])
            self.local = grad.to_local().float()
        else:
            self.row0, self.rows = 0, grad.shape[0]
            self.local = grad.detach().float()

    def my_rows(self, full_rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a replicated m x k matrix."""
        return full_rows[self.row0 : self.row0 + self.rows]

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The m x k matrix whose rows are spread over ranks like G's."""
        if not self.dist:
            return local
        from torch.distributed.tensor import DTensor

        m, k = self.shape[0], local.shape[1]
        return DTensor.from_local(local.contiguous(), self.mesh, self.placements, shape=(m, k), stride=(k, 1)).full_tensor()


NORMALIZERS = ("lu", "qr")


def _normalize(y: torch.Tensor, normalizer: str) -> torch.Tensor:
    """A well-conditioned basis of ``y``'s column space, between power iterations.

    ``"lu"`` (default): the row-permuted unit lower-triangular factor ``P L`` of ``y = P L U`` (partial
    pivoting keeps ``|L| <= 1``), as Halko, Martinsson & Tropp (2011, sec. 4.5) and scikit-learn's
    ``randomized_range_finder`` do. It only has to stop the columns collapsing onto the top singular
    vector, not be orthonormal (the last step re-orthonormalizes by QR), and costs about a quarter of
    a Householder QR at 2048 x 512 on CPU (docs/benchmarks/galore_refresh.md). ``"qr"``: the Q of QR.
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer = {normalizer!r}; allowed: {', '.join(NORMALIZERS)}")
    if normalizer == "qr":
        return torch.linalg.qr(y, mode="reduced").Q
    # the _ex variant does not raise on a zero pivot (a rank-deficient or all-zero y, e.g. the zero
    # gradients torch.distributed.checkpoint steps with): L is still unit triangular, so full rank
    lu, pivots, _ = torch.linalg.lu_factor_ex(y)
    lower = lu.tril(-1)
    lower.diagonal().fill_(1.0)
    # LAPACK pivots (1-based): row i was swapped with row pivots[i], in order; y[perm] = L U.
    perm = list(range(y.shape[0]))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    out = torch.empty_like(lower)
    out[torch.tensor(perm, device=y.device)] = lower
    return out


def _leading_left_vectors(y: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` left singular vectors of the tall thin ``y`` (d x l): ``y = Q R``, then the
    SVD of the small l x l ``R`` (no squaring of the spectrum, unlike an eigh of ``y^T y``)."""
    q, r = torch.linalg.qr(y, mode="reduced")
    u_r = torch.linalg.svd(r, full_matrices=False).U
    return q @ u_r[:, :rank]


def randomized_range(
    rows: _Rows, rank: int, side: str, *, power_iters: int = 2, oversample: int = 0, seed: int = 0,
    normalizer: str = "lu",
) -> torch.Tensor:
    """Top-``rank`` singular subspace of the (row-sharded) gradient by randomized subspace iteration.

    Left side: ``Y = (G G^T)^q G Omega`` (m x l, re-based once per iteration), right side:
    ``Y = (G^T G)^q G^T Omega`` (n x l); the basis returned is the top-``rank`` left singular vectors of
    Y (ordered by estimated singular value). Between iterations Y is re-based by ``normalizer`` (see
    ``_normalize``); the last Y is orthonormalized by QR. Returns P (m x rank, orthonormal columns)
    for ``"left"`` and Q (rank x n, orthonormal rows) for ``"right"``; identical on every rank. For a gradient of
    rank <= l = rank + oversample, Y spans its exact column (row) space.
    """
    m, n = rows.shape
    g = rows.local
    dim = m if side == "left" else n
    width = min(rank + max(oversample, 0), dim)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if side == "left":
        omega = torch.randn(n, width, generator=gen).to(g.device)
        y = rows.gather_rows(g @ omega)  # G omega, m x l
        for _ in range(power_iters):
            z = rows.allreduce(g.T @ rows.my_rows(_normalize(y, normalizer)))  # G^T Y, n x l
            y = rows.gather_rows(g @ z)  # G G^T Y, m x l
        return _leading_left_vectors(y, rank).contiguous()
    omega = torch.randn(m, width, generator=gen).to(g.device)
    y = rows.allreduce(g.T @ rows.my_rows(omega))  # G^T omega, n x l
    for _ in range(power_iters):
        y = rows.allreduce(g.T @ (g @ _normalize(y, normalizer)))  # G^T G Y, n x l
    return _leading_left_vectors(y, rank).T.contiguous()


def svd_projection(full: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The reference's refresh: full SVD of the fp32 gradient."""
    u, _, vh = torch.linalg.svd(full.float(), full_matrices=False)
    return (u[:, :rank] if side == "left" else vh[:rank, :]).contiguous()


def _seed(group_index: int, param_index: int, step: int) -> int:
    return zlib.crc32(f"{group_index}:{param_index}:{step}".encode()) & 0x7FFFFFFF


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
        self._svd_turn = 0  # next owner of a distributed exact-SVD refresh
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
    def _wrap_like(self, p: torch.Tensor, local: torch.Tensor, rows: _Rows, sharded: bool) -> torch.Tensor:
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

    def _refresh_svd_distributed(self, jobs: list[tuple[dict, torch.Tensor, _Rows]]) -> dict[int, torch.Tensor]:
        """Exact SVD refreshes under FSDP2, spread over ranks by matrix (see the module docstring)."""
        import torch.distributed as dist

        out: dict[int, torch.Tensor] = {}
        if not jobs:
            return out
        group = jobs[0][2].group
        world = dist.get_world_size(group)
        me = dist.get_rank(group)
        # Owners rotate across chunks, groups and steps (the turn advances identically on every
        # rank), so a short chunk or a one-matrix group does not always land on rank 0. Which rank
        # computes a projection does not change it: every owner sees the same full gradient.
        for start in range(0, len(jobs), world):
            chunk = jobs[start : start + world]
            owners = [(self._svd_turn + j) % world for j in range(len(chunk))]
            self._svd_turn = (self._svd_turn + len(chunk)) % world
            mine: dict[int, torch.Tensor] = {}
            for j, (g, p, rows) in enumerate(chunk):
                full = p.grad.full_tensor()  # collective: every rank takes part
                if owners[j] == me:
                    mine[j] = svd_projection(full, int(g["proj_rank"]), std_side(rows.shape))
                del full
            for j, (g, p, rows) in enumerate(chunk):
                m, n = rows.shape
                r = int(g["proj_rank"])
                shape = (m, r) if std_side(rows.shape) == "left" else (r, n)
                buf = mine[j] if j in mine else torch.empty(shape, dtype=torch.float32, device=rows.local.device)
                dist.broadcast(buf, src=dist.get_global_rank(group, owners[j]), group=group)
                out[id(p)] = buf
        return out

    def compute_projection(self, group: dict, rows: _Rows, side: str, seed: int) -> torch.Tensor:
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

        live = [(pi, p) for pi, p in enumerate(group["params"]) if p.grad is not None]
        rows_of = {id(p): _Rows(p.grad) for _, p in live}
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
                    proj = self.compute_projection(group, rows, side, _seed(gi, pi, step_before))
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
            # Adam(R) = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps), in torch.optim.AdamW's order and with
            # as few kernels as it allows: the step's host-side cost grows with the kernel count
            # (benchmarks/optimizer_overhead.py)
            denom = exp_avg_sq.float().sqrt().div_(math.sqrt(bc2)).add_(eps)
            direction = exp_avg.float().div(denom).div_(bc1)
            update = p_rows @ direction if side == "left" else direction @ proj

            p_local = self._local(p.data) if rows.dist else p.data
            if wd != 0:
                p_local.mul_(1 - lr * wd)
            p_local.add_(update.to(p_local.dtype), alpha=-lr * scale)
            if fira:
                dim = 0 if side == "left" else 1  # per column (left) / per row (right)
                norm = torch.linalg.vector_norm
                phi = norm(direction, dim=dim, keepdim=True).div_(norm(low, dim=dim, keepdim=True).add_(1e-8))
                back_low = p_rows @ low if side == "left" else low @ proj
                scaled = g.sub(back_low).mul_(phi)
                c_t = math.sqrt(bc2) / bc1
                norm_ref = rows.allreduce(scaled.square().sum().reshape(1))[0].sqrt_().div_(c_t)
                prev = state["fira_prev"]
                # limiter = max(||S|| / prev, gamma) / gamma. The first step after creation or a
                # reset has prev = -1: the ratio is <= 0, the clamp gives gamma and the limiter 1,
                # so that step is not limited, without a host sync.
                limiter = torch.clamp(norm_ref / (prev + 1e-8), min=gamma).div_(gamma)
                prev.copy_(norm_ref / limiter)
                p_local.addcdiv_(scaled.to(p_local.dtype), limiter, value=-lr)

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
