"""Low-rank factorization trained from scratch: W = s B A (B m x r, A r x n, s = alpha / r).

The dense W is never built in training: the layer computes ``s (x A^T) B^T``. ``linear.weight``
still returns the dense product for anything that reads it.

Initialization (after the model's own ``init_weights``, whose writes into W are lost): both factors
must be non-zero, otherwise training cannot start when every projection of a block is factorized
(with B = 0 everywhere, every attention and MLP output is zero and so are all factor gradients).

* ``init = "normal"`` (default): B and A entries N(0, sigma^2) with sigma chosen so that the entries
  of s B A have standard deviation ``init_std`` (0.02, torchtitan's Linear init), like a dense layer.
* ``init = "kaiming"``: each factor as a torch ``nn.Linear`` of its own shape would be
  (kaiming-uniform, a = sqrt 5), i.e. treating the layer as two stacked Linears (what low-rank
  baselines built from two ``nn.Linear`` modules get).

Draws come from a CPU generator seeded by ``seed`` and the weight's fully qualified name and are
written whole into the (possibly sharded) originals, so any number of ranks gets the same values.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from slimtrain.registry import Capability, ConfigError, DEFAULT_TARGETS, Method, check_choice, check_range, hookimpl
from slimtrain.registry.parametrization import FactorizedParametrization, capturing_init, seeded_generator
from slimtrain.registry.tensors import local_tensor, write_full_

NAME = "low_rank"


def check_rank(method: str, rank: int, fqn: str, shape: tuple[int, int]) -> None:
    """ConfigError naming the weight and its shape when ``rank`` does not fit it."""
    if rank <= 0 or rank > min(shape):
        raise ConfigError(
            f"[{method}] rank = {rank} does not fit {fqn}.weight of shape {tuple(shape)}: "
            f"need 1 <= rank <= min(m, n) = {min(shape)}; lower rank or narrow `targets`"
        )


def balanced_svd_factors(w: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """B, A with ``scale * B @ A`` the best rank-``rank`` approximation of ``w`` (balanced:
    B = U_r sqrt(S_r / scale), A = sqrt(S_r / scale) V_r^T), contiguous, in w's dtype."""
    u, s, vh = torch.linalg.svd(w.detach().to(torch.promote_types(w.dtype, torch.float32)), full_matrices=False)
    root = torch.sqrt(s[:rank] / scale)
    b = (u[:, :rank] * root).to(w.dtype).contiguous()
    a = (root[:, None] * vh[:rank]).to(w.dtype).contiguous()
    return b, a


def throwaway_weight(like: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """What a factorized parametrization returns while the model's own init runs: a scratch
    tensor the init may write into (the writes are meant to be lost; factors are set later)."""
    return torch.empty((out_features, in_features), dtype=like.dtype, device=local_tensor(like).device)


class LowRankParametrization(FactorizedParametrization):
    roles = ("B", "A")
    tp_dims = {"B": (0, None), "A": (None, 1)}  # B follows W's rows, A its columns

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, init: str, init_std: float, seed: int):
        super().__init__(NAME, out_features, in_features)
        self.rank = rank
        self.scale = scale
        self.init = init
        self.init_std = init_std
        self.seed = seed

    def forward(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if capturing_init():
            return throwaway_weight(b, self.out_features, self.in_features)
        return self.scale * (b @ a)

    def right_inverse(self, w: torch.Tensor):
        if w.device.type == "meta":
            return (
                torch.empty((self.out_features, self.rank), dtype=w.dtype, device=w.device),
                torch.empty((self.rank, self.in_features), dtype=w.dtype, device=w.device),
            )
        return balanced_svd_factors(w, self.rank, self.scale)

    @torch.no_grad()
    def initialize(self, originals: dict[str, torch.Tensor], fqn: str) -> None:
        b, a = originals["B"], originals["A"]
        g = seeded_generator(NAME, self.seed, fqn)
        if self.init == "normal":
            sigma = math.sqrt(self.init_std / (self.scale * math.sqrt(self.rank)))
            new_b = torch.randn(tuple(b.shape), generator=g) * sigma
            new_a = torch.randn(tuple(a.shape), generator=g) * sigma
        else:  # kaiming: each factor as nn.Linear initializes its own weight
            new_b = nn.init.kaiming_uniform_(torch.empty(tuple(b.shape)), a=math.sqrt(5), generator=g)
            new_a = nn.init.kaiming_uniform_(torch.empty(tuple(a.shape)), a=math.sqrt(5), generator=g)
        write_full_(b, new_b)
        write_full_(a, new_a)

    def linear_forward(self, x, originals, bias):
        b, a = originals
        h = nn.functional.linear(x, a)
        if self.scale != 1.0:
            h = h * self.scale
        return nn.functional.linear(h, b, bias)


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    rank: int = 128
    alpha: float | None = None  # scale = alpha / rank; None: scale 1
    init: str = "normal"  # "normal" (s B A has init_std entries) or "kaiming" (each factor as nn.Linear)
    init_std: float = 0.02
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        check_range(NAME, "rank", self.rank, low=1)
        check_range(NAME, "alpha", self.alpha, low=0.0, low_inclusive=False)
        check_choice(NAME, "init", self.init, ("normal", "kaiming"))
        check_range(NAME, "init_std", self.init_std, low=0.0, low_inclusive=False)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


class LowRank(Method):
    name = NAME
    summary = "W = (alpha/r) B A trained from scratch; computes x A^T B^T, never W"
    tensor_parallel = True  # B sharded with W's rows (column-wise TP), A with its columns (row-wise)
    Config = LowRankConfig
    provides = frozenset({Capability.PARAMETRIZATION, Capability.FACTORIZED, Capability.MEMORY_ESTIMATE})

    def make_parametrization(self, linear: nn.Linear, fqn: str) -> LowRankParametrization:
        c = self.config
        shape = (linear.out_features, linear.in_features)
        check_rank(NAME, c.rank, fqn, shape)
        return LowRankParametrization(*shape, rank=c.rank, scale=c.scale, init=c.init, init_std=c.init_std, seed=c.seed)


@hookimpl
def register_methods(register):
    register(LowRank)
