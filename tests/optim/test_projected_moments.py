"""The shared projected-moments helper (registry/projected_moments.py) on its own.

GaLore, Fira and APOLLO are checked against their packages elsewhere; these pin the pieces they
share, each against a direct statement of the quantity.
"""

from __future__ import annotations

import pytest
import torch

from slimtrain.registry import ConfigError
from slimtrain.registry.method import ParamSpec
from slimtrain.registry.projected_moments import (
    channel_ratio,
    check_rank,
    limiter_from_norm,
    norm_growth_limiter,
    project,
    project_back,
    scaled_norm,
)
from slimtrain.registry.sharded import RowShards


@pytest.mark.parametrize("phi_shape", [(), (1, 1), (1, 9), (7, 1)])
def test_scaled_norm_is_the_norm_of_the_scaled_gradient(phi_shape):
    g = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))
    phi = torch.rand(phi_shape, generator=torch.Generator().manual_seed(1)) + 0.1
    want = torch.linalg.vector_norm(g * phi)
    torch.testing.assert_close(scaled_norm(g, phi, RowShards(g)), want, rtol=1e-6, atol=0)


def test_limiter_records_the_first_norm_then_limits_growth_to_gamma():
    prev = torch.tensor(-1.0)
    assert limiter_from_norm(torch.tensor(3.0), prev, 1.01).item() == 1.0  # first step: recorded only
    assert prev.item() == 3.0
    limiter = limiter_from_norm(torch.tensor(6.0), prev, 1.01)  # doubled: limited to 1.01 x 3
    torch.testing.assert_close(limiter, torch.tensor(2.0 / 1.01 * (3.0 / (3.0 + 1e-8))))
    torch.testing.assert_close(prev, torch.tensor(3.0 * 1.01), rtol=1e-6, atol=0)
    assert limiter_from_norm(torch.tensor(2.0), prev, 1.01).item() == 1.0  # shrinking: not limited
    assert prev.item() == 2.0


def test_norm_growth_limiter_divides_out_a_factor_before_comparing():
    s = torch.full((4, 4), 0.5)  # ||s|| = 2
    prev = torch.tensor(1.0)
    norm_growth_limiter(s, prev, RowShards(s), 1.01, norm_divisor=2.0)  # compares ||s|| / 2 = 1 to 1
    torch.testing.assert_close(prev, torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(5, 8), (8, 5)])
def test_projection_and_channel_ratio_follow_the_side(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    side = "left" if shape[0] < shape[1] else "right"
    basis = torch.linalg.qr(torch.randn(min(shape), 3, generator=torch.Generator().manual_seed(3))).Q
    proj = basis if side == "left" else basis.T.contiguous()
    low, b = project(RowShards(g), proj, side)
    torch.testing.assert_close(low, basis.T @ g if side == "left" else g @ basis)
    torch.testing.assert_close(project_back(low, b, side), basis @ basis.T @ g if side == "left" else g @ basis @ basis.T)
    direction = 2 * low
    phi = channel_ratio(direction, low, side)
    assert phi.shape == ((1, shape[1]) if side == "left" else (shape[0], 1))
    torch.testing.assert_close(phi, torch.full_like(phi, 2.0), rtol=1e-6, atol=0)


def test_rank_above_the_smaller_dimension_is_refused_naming_method_parameter_and_range():
    spec = ParamSpec("layers.0.wq.weight", "layers.0.wq", "weight", (6, 4), is_linear=True)
    check_rank("somemethod", 4, spec)
    with pytest.raises(ConfigError, match=r"\[somemethod\] rank = 5 .*layers.0.wq.weight.*6 x 4.*\[1, 4\]"):
        check_rank("somemethod", 5, spec)
