"""Low-rank subspaces of a (row-sharded) gradient: the refreshes GaLore-style rules use.

``randomized_range`` (randomized subspace iteration) and ``svd_projection`` (exact SVD) return the
projection P (m x r, for the left side) or Q (r x n, right side) on every rank identically;
``std_side`` is the reference's rule for which side to project. The math and its FSDP2 behaviour
are written up in docs/methods/galore-fira.md.
"""

from __future__ import annotations

import zlib

import torch

from slimtrain.registry.sharded import RowShards

PROJ_METHODS = ("auto", "randomized", "svd")

#: the randomized refresh's defaults (chosen in docs/benchmarks/galore_refresh.md, "Randomized-refresh
#: defaults": within 1e-3 of the exact-SVD trajectory on full-rank noisy gradients with a spectral gap,
#: tests/optim/test_refresh_defaults.py)
DEFAULT_POWER_ITERS = 3
DEFAULT_OVERSAMPLE = 8


def resolve_proj_method(proj_method: str, reference: bool) -> str:
    """``"auto"``: the released packages' exact SVD under the reference convention, else the
    randomized refresh."""
    if proj_method == "auto":
        return "svd" if reference else "randomized"
    return proj_method


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


def canonical_signs(basis: torch.Tensor, dim: int) -> torch.Tensor:
    """Flip each basis vector so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign, and Adam is elementwise, so the sign of a basis vector
    changes the update of every step after a refresh. Both refreshes end here, so they agree on the
    sign; ties go to the first such entry (``argmax``), and every rank holds the same basis, so
    every rank flips the same way. ``dim`` is the dimension along which a vector runs (0: columns
    of P, 1: rows of Q)."""
    idx = basis.abs().argmax(dim=dim, keepdim=True)
    signs = torch.sign(basis.gather(dim, idx))
    signs[signs == 0] = 1
    return basis * signs


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the tall thin ``y`` (QR)."""
    return torch.linalg.qr(y, mode="reduced").Q


def randomized_range(
    rows: RowShards, rank: int, side: str, *, power_iters: int = DEFAULT_POWER_ITERS,
    oversample: int = DEFAULT_OVERSAMPLE, seed: int = 0,
    normalizer: str = "lu", gram: bool | None = None,
) -> torch.Tensor:
    """The top-``rank`` singular vectors of the (row-sharded) gradient by a randomized SVD.

    Range finder: ``Y = (G G^T)^q G Omega`` (left side, m x l) or ``Y = (G^T G)^q G^T Omega`` (right
    side, n x l), l = rank + oversample, re-based between iterations by ``normalizer`` (see
    ``normalize_basis``), then orthonormalized (``Y = Q_Y R``). Then the randomized SVD is finished on
    G itself, not on the sketch: G's singular vectors are those of the small matrix ``B = Q_Y^T G``
    (left, l x n) or ``B = G Q_Y`` (right, m x l) rotated back by ``Q_Y``. Adam's update depends on
    the basis (not only its span), so this is what makes the randomized refresh GaLore's refresh:
    for a gradient of rank <= l it returns the exact singular vectors, signs fixed by
    ``canonical_signs`` as the svd refresh's are.

    Row-sharded G (FSDP2): the left sketch ``G Omega`` is gathered (m x l) and ``B = sum_k Q_k^T G_k``
    is one all-reduce of l x n; on the right ``G^T Y`` is an all-reduce of n x l and the small
    factor's Gram matrix ``B^T B = sum_k B_k^T B_k`` one all-reduce of l x l. The small factor's
    singular vectors come from an eigh of its float64 Gram matrix (squaring the spectrum costs no
    accuracy that matters at fp32 inputs). G is never gathered.

    Right side, ``gram`` (None: where ``gram_is_cheaper``, e.g. a tall 5461 x 2048 at rank 512):
    the same from ``H = G^T G`` formed once (``_right_by_gram``), every later product n x n x l.

    Returns P (m x rank, orthonormal columns) for ``"left"`` and Q (rank x n, orthonormal rows) for
    ``"right"``; identical on every rank.
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
        q_y = orthonormal_basis(y)  # m x l
        b = rows.allreduce(rows.my_rows(q_y).T @ g).double()  # Q_Y^T G, l x n
        u_b = _top_eigenvectors(b @ b.T, rank).to(q_y.dtype)  # left singular vectors of B
        return canonical_signs(q_y @ u_b, dim=0).contiguous()
    use_gram = gram_is_cheaper(m, n, width, power_iters) if gram is None else gram
    if use_gram:
        return _right_by_gram(rows, rank, width, power_iters, gen, normalizer)
    omega = torch.randn(m, width, generator=gen).to(g.device)
    y = rows.allreduce(g.T @ rows.my_rows(omega))  # G^T omega, n x l
    for _ in range(power_iters):
        y = rows.allreduce(g.T @ (g @ normalize_basis(y, normalizer)))  # G^T G Y, n x l
    q_y = orthonormal_basis(y)  # n x l
    b = (g @ q_y).double()  # this rank's rows of G Q_Y, m_k x l
    v_b = _top_eigenvectors(rows.allreduce(b.T @ b), rank).to(q_y.dtype)  # right singular vectors of B
    return canonical_signs((q_y @ v_b).T, dim=1).contiguous()


def gram_is_cheaper(m: int, n: int, width: int, power_iters: int) -> bool:
    """Whether the right side's Gram path costs fewer multiply-adds than the product path:
    ``m n^2 + (q + 2) n^2 l`` (form ``H = G^T G`` once, then every product is n x n x l) against
    ``(2 q + 2) m n l`` (every product touches G). True for tall matrices with l not far below n,
    e.g. 5461 x 2048 at rank 512 (1.4x fewer), false for square ones at that rank."""
    return m * n * n + (power_iters + 2) * n * n * width < (2 * power_iters + 2) * m * n * width


def symmetric_gram(g: torch.Tensor) -> torch.Tensor:
    """``G^T G`` from three of its four column-half blocks (the fourth is the transpose of one):
    3/4 of a general product's multiply-adds, as BLAS's syrk would do (torch has none). 0.34 s
    against 0.42 s for ``g.T @ g`` at 5461 x 2048 (one thread, CPU time, docs/benchmarks/galore_refresh.md)."""
    n = g.shape[1]
    k = n // 2
    if k == 0:
        return g.T @ g
    a, b = g[:, :k], g[:, k:]
    h = torch.empty(n, n, dtype=g.dtype, device=g.device)
    torch.mm(a.T, a, out=h[:k, :k])
    torch.mm(b.T, b, out=h[k:, k:])
    ab = a.T @ b
    h[:k, k:] = ab
    h[k:, :k] = ab.T
    return h


def _right_by_gram(
    rows: RowShards, rank: int, width: int, power_iters: int, gen: torch.Generator, normalizer: str,
) -> torch.Tensor:
    """The right side from ``H = G^T G`` (n x n; row-sharded G: one all-reduce of n x n, the sum of
    every rank's ``G_k^T G_k``). Range finder ``Y = H^(q+1) Omega`` (Omega n x l: one half power
    iteration more than the product path's ``(G^T G)^q G^T Omega``), re-based as there; the small
    factor's Gram matrix ``B^T B = Q_Y^T H Q_Y`` (B = G Q_Y) needs no further product with G."""
    g = rows.local
    n = rows.shape[1]
    h = rows.allreduce(symmetric_gram(g))  # n x n
    omega = torch.randn(n, width, generator=gen).to(g.device)
    y = h @ omega
    for _ in range(power_iters):
        y = h @ normalize_basis(y, normalizer)
    q_y = orthonormal_basis(y)  # n x l
    small = (q_y.T @ (h @ q_y)).double()
    small = (small + small.T) / 2  # symmetric up to fp32 rounding
    v_b = _top_eigenvectors(small, rank).to(q_y.dtype)
    return canonical_signs((q_y @ v_b).T, dim=1).contiguous()


def _top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Eigenvectors of the symmetric l x l ``gram`` (float64) for its ``rank`` largest eigenvalues,
    largest first: the singular vectors of the small factor B, by singular value. An eigh of the
    float64 Gram matrix costs a sixth of an SVD of the l x n factor at 512 x 5461 on CPU and squares
    no error that matters at fp32 inputs."""
    return torch.linalg.eigh(gram).eigenvectors.flip(-1)[:, :rank]


def svd_projection(full: torch.Tensor, rank: int, side: str, *, canonical: bool = True) -> torch.Tensor:
    """The reference's refresh: full SVD of the fp32 gradient.

    ``canonical`` (default): signs by ``canonical_signs``, the randomized refresh's convention, so
    the two refreshes agree. ``canonical=False``: the signs ``torch.linalg.svd`` returns, as the
    released galore-torch / fira packages keep them (the reference convention steps as they do)."""
    u, _, vh = torch.linalg.svd(full.float(), full_matrices=False)
    if side == "left":
        basis, dim = u[:, :rank], 0
    else:
        basis, dim = vh[:rank, :], 1
    return (canonical_signs(basis, dim=dim) if canonical else basis).contiguous()


def refresh_seed(group_index: int, param_index: int, step: int) -> int:
    return zlib.crc32(f"{group_index}:{param_index}:{step}".encode()) & 0x7FFFFFFF
