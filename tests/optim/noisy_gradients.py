"""Full-rank, gradient-like test inputs: a drifting low-rank signal plus Gaussian noise.

Real gradients are full rank: a few strong directions that move slowly between steps, over a noise
floor. Exactly low-rank test gradients hide two things this reproduces: a refresh that is exact only
up to the sketch width (the randomized SVD on a rank <= l gradient), and SVD signs that flip
between refreshes (LAPACK's sign is arbitrary, and with a drifting signal it does flip).
"""

from __future__ import annotations

import math

import torch


def drifting_noisy_gradients(
    shape: tuple[int, int], steps: int, *, signal_rank: int, noise: float, seed: int,
    drift: float = 0.1, scale: float = 1e-3, growth: float = 0.0, weakest: float = 0.1,
) -> list[torch.Tensor]:
    """``steps`` fp32 gradients ``scale * (1 + growth t) * (U_t diag(s) V_t^T + N_t)``.

    ``s`` runs from 1 down to ``weakest`` (0.1; log-spaced, ``signal_rank`` values); ``U_t, V_t`` are orthonormal
    bases that take a random step of size ``drift`` every step (re-orthonormalized); ``N_t`` is
    Gaussian with spectral norm about ``noise`` (entries of std ``noise / (sqrt(m) + sqrt(n))``), so
    ``noise`` is the noise floor relative to the strongest signal direction. ``growth`` lets the
    gradient's norm grow (Fira's limiter engages). Entries of about 1e-3 at ``scale`` 1e-3: language
    models' gradients are that small, which is where eps's place in Adam matters."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    k = signal_rank
    spectrum = torch.logspace(0, math.log10(weakest), k, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    noise_std = noise / (m**0.5 + n**0.5)
    out = []
    for t in range(steps):
        signal = (u * spectrum) @ v.T
        grad = signal + noise_std * torch.randn(m, n, generator=g, dtype=torch.float64)
        out.append((scale * (1 + growth * t) * grad).float())
        u = torch.linalg.qr(u + drift / k**0.5 * torch.randn(m, k, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(v + drift / k**0.5 * torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return out


def max_relative_gap(a_traj, b_traj, w0) -> float:
    """Largest ``||a_t - b_t|| / ||b_t - w0||`` over the steps: relative to the distance travelled."""
    return max(float((a - b).norm() / (b - w0).norm()) for a, b in zip(a_traj, b_traj))
