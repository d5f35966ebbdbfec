"""LoRA for pretraining: W = W0 + (alpha / r) B A with W0 frozen.

W0 is the model's own random initialization: while the model's ``init_weights`` runs under
``slimtrain.registry.parametrization.capture_init()`` the parametrization returns W0 itself, so the model's
init writes into it. Then ``initialize`` sets A kaiming-uniform (a = sqrt 5) and B = 0, so the layer
starts as exactly W0. The layer computes ``x W0^T + s (x A^T) B^T`` and never builds W.

ReLoRA is this method composed with ``lora_merge`` (periodic W0 += s B A, re-init) and
``momentum_reset`` (optimizer state reset with a short LR re-warm).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from slimtrain.plugins.low_rank import check_rank
from slimtrain.registry import Capability, DEFAULT_TARGETS, Method, check_range, hookimpl
from slimtrain.registry.parametrization import FactorizedParametrization, capturing_init, seeded_generator
from slimtrain.registry.tensors import write_full_

NAME = "lora"


def kaiming_a(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """LoRA's A init, kaiming-uniform with a = sqrt 5: U(-1/sqrt(n), 1/sqrt(n)), drawn on the CPU."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


class LoRAParametrization(FactorizedParametrization):
    roles = ("W0", "B", "A")
    frozen_roles = frozenset({"W0"})
    tp_dims = {"W0": (0, 1), "B": (0, None), "A": (None, 1)}  # W0 like W, B its rows, A its columns

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, seed: int):
        super().__init__(NAME, out_features, in_features)
        self.rank = rank
        self.scale = scale
        self.seed = seed

    def forward(self, w0: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if capturing_init():
            return w0  # the model's init_weights writes W0 in place
        return w0 + self.scale * (b @ a)

    def right_inverse(self, w: torch.Tensor):
        m, n, r = self.out_features, self.in_features, self.rank
        b = torch.zeros((m, r), dtype=w.dtype, device=w.device)
        a = torch.zeros((r, n), dtype=w.dtype, device=w.device)
        w0 = torch.empty_like(w) if w.device.type == "meta" else w.detach().clone()
        return w0, b, a

    @torch.no_grad()
    def initialize(self, originals: dict[str, torch.Tensor], fqn: str) -> None:
        a = originals["A"]
        write_full_(a, kaiming_a(tuple(a.shape), seeded_generator(NAME, self.seed, fqn)))
        originals["B"].zero_()

    def linear_forward(self, x, originals, bias):
        w0, b, a = originals
        h = nn.functional.linear(x, a)
        if self.scale != 1.0:
            h = h * self.scale
        return nn.functional.linear(x, w0, bias) + nn.functional.linear(h, b)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 128
    alpha: float = 32.0  # scale = alpha / rank
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        check_range(NAME, "rank", self.rank, low=1)
        check_range(NAME, "alpha", self.alpha, low=0.0, low_inclusive=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRA(Method):
    name = NAME
    summary = "W = W0 + (alpha/r) B A, W0 frozen from the model's own init (ReLoRA with lora_merge)"
    tensor_parallel = True  # W0 sharded like W, B with its rows, A with its columns
    Config = LoRAConfig
    provides = frozenset(
        {Capability.PARAMETRIZATION, Capability.FACTORIZED, Capability.FROZEN_BASE, Capability.MEMORY_ESTIMATE}
    )

    def make_parametrization(self, linear: nn.Linear, fqn: str) -> LoRAParametrization:
        c = self.config
        shape = (linear.out_features, linear.in_features)
        check_rank(NAME, c.rank, fqn, shape)
        return LoRAParametrization(*shape, rank=c.rank, scale=c.scale, seed=c.seed)


@hookimpl
def register_methods(register):
    register(LoRA)
