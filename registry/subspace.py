"""Low-rank subspaces of a (row-sharded) gradient: the refreshes GaLore-style rules use.

``randomized_range`` (randomized subspace iteration) and ``svd_projection`` (exact SVD) return the
projection P (m x r, for the left side) or Q (r x n, right side) on every rank identically;
``std_side`` is the reference's rule for which side to project. The math and its FSDP2 behaviour
are written up in docs/methods/galore-fira.md.
"""

from __future__ import annotations

import zlib

import torch

from registry.sharded import RowShards

PROJ_METHODS = ("randomized", "svd")


def std_side(shape: tuple[int, ...]) -> str:
    """The reference's "std" rule: project on the smaller dimension (left when m < n)."""
    m, n = shape
    return "left" if m < n else "right"


NORMALIZERS = ("lu", "qr")


def normalize_basis(y: torch.Tensor, normalizer: str) -> torch.Tensor:
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


def leading_left_vectors(y: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` left singular vectors of the tall thin ``y`` (d x l): ``y = Q R``, then the
    SVD of the small l x l ``R`` (no squaring of the spectrum, unlike an eigh of ``y^T y``)."""
    q, r = torch.linalg.qr(y, mode="reduced")
    u_r = torch.linalg.svd(r, full_matrices=False).U
    return q @ u_r[:, :rank]


def randomized_range(
    rows: RowShards, rank: int, side: str, *, power_iters: int = 2, oversample: int = 0, seed: int = 0,
    normalizer: str = "lu",
) -> torch.Tensor:
    """Top-``rank`` singular subspace of the (row-sharded) gradient by randomized subspace iteration.

    Left side: ``Y = (G G^T)^q G Omega`` (m x l, re-based once per iteration), right side:
    ``Y = (G^T G)^q G^T Omega`` (n x l); the basis returned is the top-``rank`` left singular vectors of
    Y (ordered by estimated singular value). Between iterations Y is re-based by ``normalizer`` (see
    ``normalize_basis``); the last Y is orthonormalized by QR. Returns P (m x rank, orthonormal columns)
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
            z = rows.allreduce(g.T @ rows.my_rows(normalize_basis(y, normalizer)))  # G^T Y, n x l
            y = rows.gather_rows(g @ z)  # G G^T Y, m x l
        return leading_left_vectors(y, rank).contiguous()
    omega = torch.randn(m, width, generator=gen).to(g.device)
    y = rows.allreduce(g.T @ rows.my_rows(omega))  # G^T omega, n x l
    for _ in range(power_iters):
        y = rows.allreduce(g.T @ (g @ normalize_basis(y, normalizer)))  # G^T G Y, n x l
    return leading_left_vectors(y, rank).T.contiguous()


def svd_projection(full: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The reference's refresh: full SVD of the fp32 gradient."""
    u, _, vh = torch.linalg.svd(full.float(), full_matrices=False)
    return (u[:, :rank] if side == "left" else vh[:rank, :]).contiguous()


def refresh_seed(group_index: int, param_index: int, step: int) -> int:
    return zlib.crc32(f"{group_index}:{param_index}:{step}".encode()) & 0x7FFFFFFF
