"""SLTrain: sparse plus low-rank, W = (alpha / r) B A + S.

S has a fixed random support of ``round(delta m n)`` entries drawn without replacement from a CPU
generator seeded by ``seed`` and the weight's fully qualified name, so every rank and every resume
draws the same support. The support is a persistent int64 buffer of the parametrization (saved with
the checkpoint as ``<linear>.parametrizations.weight.0.index``, flat row-major positions, sorted);
only the values (role "S") train.

Init as the reference: A kaiming-uniform (a = sqrt 5), B = 0, S values U(-1/sqrt(n), 1/sqrt(n)).

The layer runs through ``SparseLowRankLinear``, a custom autograd function that builds W in
forward, keeps only x, B, A, the values and the index for backward, and rebuilds W there: no dense
m x n weight per layer stays alive between forward and backward.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from slimtrain.plugins.low_rank import balanced_svd_factors, check_rank, throwaway_weight
from slimtrain.registry import Capability, ConfigError, DEFAULT_TARGETS, Method, check_range, hookimpl
from slimtrain.registry.parametrization import FactorizedParametrization, capturing_init, seeded_generator
from slimtrain.registry.tensors import write_full_

NAME = "sltrain"


def support_size(delta: float, m: int, n: int) -> int:
    return int(round(delta * m * n))


def draw_support(seed: int, fqn: str, m: int, n: int, delta: float) -> torch.Tensor:
    """Sorted, unique flat indices into an m x n matrix (int64, CPU), ``round(delta m n)`` of them,
    a pure function of (seed, fqn, m, n, delta)."""
    g = seeded_generator(NAME, "support", seed, fqn)
    total, k = m * n, support_size(delta, m, n)
    # Uniform k-subset in O(k log k) instead of a randperm of all m*n positions (about 10x faster
    # at the 1B shapes): the distinct values of iid uniform draws, then a uniform k of them.
    distinct = torch.unique(torch.randint(total, (k + k // 16 + 64,), generator=g))
    while distinct.numel() < k:
        distinct = torch.unique(torch.cat([distinct, torch.randint(total, (k,), generator=g)]))
    keep = torch.randperm(distinct.numel(), generator=g)[:k]
    return torch.sort(distinct[keep]).values


def dense_weight(b: torch.Tensor, a: torch.Tensor, values: torch.Tensor, index: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B A + scatter(S): a fresh m x n tensor.

    Built as scatter(S) first, then ``addmm_`` into it: one m x n tensor, and no in-place write to
    the output of a matmul (op-level selective activation checkpointing caches matmul outputs and
    refuses to recompute once a cached tensor was mutated)."""
    m, n = b.shape[0], a.shape[1]
    w = torch.zeros(m * n, dtype=b.dtype, device=b.device)
    w.index_add_(0, index, values.to(b.dtype))
    return w.view(m, n).addmm_(b, a, alpha=scale)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast compute dtype active for ``device_type`` (None when autocast is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class SparseLowRankLinear(torch.autograd.Function):
    """y = x W^T with W = scale B A + scatter(S), W rebuilt in backward instead of saved.

    Under autocast (torchtitan's mixed precision on one device) the whole layer computes in the
    autocast dtype, forward and backward, like an autocast ``F.linear``: inputs are cast once in
    forward and the cast copies are saved, because the backward pass runs outside autocast and a
    bf16 gradient times an fp32 input would not multiply. Gradients return in each input's dtype.
    Under FSDP2 mixed precision the parameters already arrive in bf16 and nothing is cast.
    """

    @staticmethod
    def forward(ctx, x, b, a, values, index, scale: float):
        ctx.dtypes = (x.dtype, b.dtype, a.dtype, values.dtype)
        compute = _autocast_dtype(x.device.type)
        if compute is not None:
            x, b, a, values = (t.to(compute) for t in (x, b, a, values))
        with torch.autocast(x.device.type, enabled=False):
            w = dense_weight(b, a, values, index, scale)
            y = nn.functional.linear(x, w)
        ctx.save_for_backward(x, b, a, values, index)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, gy):
        x, b, a, values, index = ctx.saved_tensors
        scale = ctx.scale
        gy = gy.to(x.dtype)
        need_x, need_b, need_a, need_v = ctx.needs_input_grad[:4]
        gx = gb = ga = gv = None
        if need_x:
            gx = gy @ dense_weight(b, a, values, index, scale)
        if need_b or need_a or need_v:
            m, n = b.shape[0], a.shape[1]
            gw = gy.reshape(-1, m).t() @ x.reshape(-1, n)  # transient m x n
            if need_v:
                gv = gw.view(-1).index_select(0, index)
            if need_b:
                gb = (gw @ a.t()).mul_(scale) if scale != 1.0 else gw @ a.t()
            if need_a:
                ga = (b.t() @ gw).mul_(scale) if scale != 1.0 else b.t() @ gw
        grads = [g if g is None else g.to(dt) for g, dt in zip((gx, gb, ga, gv), ctx.dtypes)]
        return (*grads, None, None)


def sparse_lowrank_linear(x, b, a, values, index, scale: float, bias=None):
    y = SparseLowRankLinear.apply(x, b, a, values, index, scale)
    return y if bias is None else y + bias


class SLTrainParametrization(FactorizedParametrization):
    roles = ("B", "A", "S")

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, delta: float, seed: int, fqn: str, device):
        super().__init__(NAME, out_features, in_features)
        self.rank = rank
        self.scale = scale
        self.delta = delta
        self.seed = seed
        self.fqn = fqn
        nnz = support_size(delta, out_features, in_features)
        if device is not None and torch.device(device).type == "meta":
            index = torch.empty(nnz, dtype=torch.int64, device=device)
        else:
            index = draw_support(seed, fqn, out_features, in_features, delta).to(device)
        self.register_buffer("index", index, persistent=True)

    @property
    def nnz(self) -> int:
        return self.index.numel()

    def forward(self, b: torch.Tensor, a: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if capturing_init():
            return throwaway_weight(b, self.out_features, self.in_features)
        return dense_weight(b, a, values, self.index, self.scale)

    def right_inverse(self, w: torch.Tensor):
        m, n, r = self.out_features, self.in_features, self.rank
        if w.device.type == "meta":
            return (
                torch.empty((m, r), dtype=w.dtype, device=w.device),
                torch.empty((r, n), dtype=w.dtype, device=w.device),
                torch.empty((self.nnz,), dtype=w.dtype, device=w.device),
            )
        b, a = balanced_svd_factors(w, r, self.scale)
        residual = w.detach() - self.scale * (b @ a)
        return b, a, residual.reshape(-1).index_select(0, self.index.to(w.device)).contiguous()

    @torch.no_grad()
    def initialize(self, originals: dict[str, torch.Tensor], fqn: str) -> None:
        m, n = self.out_features, self.in_features
        self.index.copy_(draw_support(self.seed, self.fqn, m, n, self.delta).to(self.index.device))
        g = seeded_generator(NAME, "init", self.seed, self.fqn)
        a, s = originals["A"], originals["S"]
        write_full_(a, nn.init.kaiming_uniform_(torch.empty(tuple(a.shape)), a=math.sqrt(5), generator=g))
        originals["B"].zero_()
        bound = 1.0 / math.sqrt(n)
        write_full_(s, torch.empty(tuple(s.shape)).uniform_(-bound, bound, generator=g))

    def linear_forward(self, x, originals, bias):
        b, a, values = originals
        return sparse_lowrank_linear(x, b, a, values, self.index, self.scale, bias)


@dataclasses.dataclass(frozen=True)
class SLTrainConfig:
    rank: int = 128
    alpha: float = 32.0  # scale = alpha / rank; the paper: 32 / 16 / 16 / 8 for 60M / 130M / 350M / 1B
    delta: float = 0.03  # density of the sparse part
    seed: int = 0  # with the weight's fqn, fixes the sparse support
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        check_range(NAME, "rank", self.rank, low=1)
        check_range(NAME, "alpha", self.alpha, low=0.0, low_inclusive=False)
        check_range(NAME, "delta", self.delta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class SLTrain(Method):
    name = NAME
    summary = "W = (alpha/r) B A + S, S sparse with a fixed random support (density delta)"
    Config = SLTrainConfig
    provides = frozenset({Capability.PARAMETRIZATION, Capability.FACTORIZED, Capability.MEMORY_ESTIMATE})

    def _check(self, fqn: str, shape: tuple[int, int]) -> int:
        check_rank(NAME, self.config.rank, fqn, shape)
        nnz = support_size(self.config.delta, *shape)
        if nnz < 1:
            raise ConfigError(
                f"[{NAME}] delta = {self.config.delta} gives an empty support for {fqn}.weight of shape "
                f"{tuple(shape)}; raise delta or narrow `targets`"
            )
        return nnz

    def make_parametrization(self, linear: nn.Linear, fqn: str) -> SLTrainParametrization:
        c = self.config
        shape = (linear.out_features, linear.in_features)
        self._check(fqn, shape)
        return SLTrainParametrization(
            *shape, rank=c.rank, scale=c.scale, delta=c.delta, seed=c.seed, fqn=fqn, device=linear.weight.device
        )

    def macs_per_token(self, module: str, shape: tuple[int, int]) -> int:
        # the layer materializes W (as the reference does) and multiplies densely
        return shape[0] * shape[1]

    def extra_bytes(self, module: str, shape: tuple[int, int]) -> int:
        return 8 * self._check(module, shape)  # the int64 support index


@hookimpl
def register_methods(register):
    register(SLTrain)
