"""The randomized refresh's Gram path (right side, tall gradients): ``H = G^T G`` once, then every
power iteration is an n x n x l product instead of two m x n x l ones (docs/methods/galore-fira.md).

It must return what the product path returns, G's top singular vectors (basis and signs), and be
chosen exactly where it costs fewer multiply-adds.
"""

from __future__ import annotations

import pytest
import torch

from slimtrain.registry.sharded import RowShards
from slimtrain.registry.subspace import (
    DEFAULT_OVERSAMPLE,
    DEFAULT_POWER_ITERS,
    gram_is_cheaper,
    randomized_range,
    svd_projection,
)
from tests.optim.noisy_gradients import drifting_noisy_gradients


def test_the_gram_path_is_taken_for_the_tall_1b_shape_and_not_for_the_square_one():
    width = 512 + DEFAULT_OVERSAMPLE
    assert gram_is_cheaper(5461, 2048, width, DEFAULT_POWER_ITERS)  # LLaMA-1B's w1 / w3 gradients, tall
    assert not gram_is_cheaper(2048, 2048, width, DEFAULT_POWER_ITERS)  # attention projections
    assert not gram_is_cheaper(4096, 1024, 136, DEFAULT_POWER_ITERS)  # rank far below n: products win


@pytest.mark.parametrize("shape,rank", [((300, 120), 16), ((400, 160), 64)])
def test_gram_and_product_paths_return_the_exact_svd_basis_when_the_spectrum_has_a_gap(shape, rank):
    """A full-rank gradient (signal 1 .. 0.1 of the projection's rank, noise floor 0.02): both paths
    give the exact SVD's rows of Q, signs included, to 1e-3 per entry."""
    g = drifting_noisy_gradients(shape, 1, signal_rank=rank, noise=0.02, seed=4)[0]
    exact = svd_projection(g, rank, "right")
    for gram in (True, False):
        q = randomized_range(RowShards(g), rank, "right", seed=9, gram=gram)
        assert q.shape == (rank, shape[1])
        torch.testing.assert_close(q @ q.T, torch.eye(rank), rtol=0, atol=1e-4)
        assert (q - exact).abs().max() < 1e-3, f"gram={gram}: {(q - exact).abs().max():.1e}"


def test_the_gram_path_recovers_a_low_rank_gradient_exactly():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(200, 6, generator=gen) @ torch.diag(torch.logspace(0, -2, 6)) @ torch.randn(6, 50, generator=gen)
    q = randomized_range(RowShards(g), 8, "right", power_iters=0, seed=2, gram=True)
    rebuilt = (g @ q.T) @ q
    assert torch.linalg.norm(rebuilt - g) <= 1e-4 * torch.linalg.norm(g)


@pytest.mark.parametrize("shape", [(7, 1), (9, 5), (40, 24), (33, 64)])
def test_symmetric_gram_is_g_transposed_times_g(shape):
    from slimtrain.registry.subspace import symmetric_gram

    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(symmetric_gram(g), g.T @ g)
