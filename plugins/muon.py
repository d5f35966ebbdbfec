"""Muon: momentum orthogonalized by Newton-Schulz iterations, on the 2-D hidden weights.

Jordan et al. 2024 (torch.optim.Muon since torch 2.9, which the tests compare against): for each
selected matrix, ``B <- mu B + (1 - mu) G`` (an EMA, torch's ``lerp``), the Nesterov look-ahead
``U = (1 - mu) G + mu B`` (or ``B`` without Nesterov), ``O = NS_k(U)`` (k quintic Newton-Schulz
iterations in bf16 with torch's coefficients, which map U to about ``U (U^T U)^{-1/2}``), then
``W <- W (1 - lr wd)`` and ``W <- W - lr * adjust(shape) * O``. The embedding, the output head and
the norms go to the default AdamW rule (``targets`` = the hidden projections), as Muon prescribes.

``adjust_lr``: "original" (Keller Jordan's ``sqrt(max(1, m/n))``, torch's default) or
"match_rms_adamw" (Moonshot's ``0.2 sqrt(max(m, n))``, so Muon runs at the AdamW LR of the same
recipe: the default here, since one trainer LR drives every rule). ``lr_ratio`` multiplies the
trainer's LR for the Muon matrices only (Keller's setting: ~0.02 with "original" vs AdamW ~1e-3).

FSDP2: Newton-Schulz needs the whole matrix. The momentum stays row-sharded (elementwise), each
matrix's look-ahead U is gathered (in ``ns_dtype``, the dtype NS works in, so nothing is lost) to one owner
rank per matrix (``slimtrain.registry.sharded.OwnerRanks``, owners rotating across matrices and steps), the
owner iterates and broadcasts O in ``ns_dtype``, and each rank applies its rows. (bf16 rounding makes
the step discontinuous in the gradient: a sharded run's reduce-scattered gradient, equal to the
unsharded one to fp32 rounding, can round differently; float32 iterations keep sharded = unsharded
to fp32 tolerance, which the FSDP test uses.)

Memory: one momentum element per selected weight element.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from slimtrain.registry import DEFAULT_TARGETS, Capability, ConfigError, Method, ParamSpec, check_choice, check_range, hookimpl
from slimtrain.registry.sharded import OwnerRanks, RowShards
from slimtrain.registry.tensors import local_tensor
from slimtrain.registry.update_rule import OnReset, RuleParam, StateSpec, StepInfo, UpdateRule

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch's (Keller Jordan's) quintic
NS_EPS = 1e-7
ADJUST_LR = ("original", "match_rms_adamw", "none")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class MuonConfig:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr: str = "match_rms_adamw"
    lr_ratio: float = 1.0  # Muon matrices step with lr_ratio x the trainer's LR
    ns_dtype: str = "bfloat16"  # the iterations' dtype: torch's/Keller's bf16, or float32
    targets: tuple[str, ...] = DEFAULT_TARGETS
    roles: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        check_range("muon", "momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_range("muon", "ns_steps", self.ns_steps, low=1, high=99)
        check_choice("muon", "adjust_lr", self.adjust_lr, ADJUST_LR)
        check_choice("muon", "ns_dtype", self.ns_dtype, tuple(NS_DTYPES))
        check_range("muon", "lr_ratio", self.lr_ratio, low=0, low_inclusive=False)
        if not self.targets:
            raise ConfigError("[muon] targets = () is empty; name at least one module pattern")
        if not self.roles:
            raise ConfigError("[muon] roles = () is empty; name at least one parameter role, e.g. 'weight'")



def newton_schulz(
    u: torch.Tensor, steps: int, coefficients=NS_COEFFICIENTS, eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``steps`` quintic Newton-Schulz iterations on ``u / ||u||_F`` in ``dtype`` (torch's: bf16), on
    the wide orientation (the Gram matrix is min(m, n) square); returns ``dtype`` of u's shape."""
    a, b, c = coefficients
    x = u.to(dtype)
    tall = u.size(0) > u.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, how: str, shape: tuple[int, int]) -> float:
    m, n = shape
    if how == "original":
        return lr * math.sqrt(max(1.0, m / n))
    if how == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(m, n))
    return lr


class MuonRule(UpdateRule):
    """Muon's step; whole-matrix Newton-Schulz on one owner rank per matrix under FSDP2."""

    def __init__(
        self, method: str, *, momentum: float, nesterov: bool, ns_steps: int, adjust_lr: str, lr_ratio: float,
        ns_dtype: str = "bfloat16",
    ):
        self.method = method
        self.ns_dtype = NS_DTYPES[ns_dtype]
        self.momentum, self.nesterov, self.ns_steps = float(momentum), bool(nesterov), int(ns_steps)
        self.adjust_lr, self.lr_ratio = adjust_lr, float(lr_ratio)
        self.owners = OwnerRanks()

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        return [StateSpec("momentum_buffer", spec.shape, None, OnReset.ZERO, moment=True, layout="rows")]

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        jobs = []
        for p in params:
            rows = RowShards(p.grad)
            g = local_tensor(p.grad)
            buf = local_tensor(p.state["momentum_buffer"])
            buf.lerp_(g, 1 - self.momentum)
            u = g.lerp(buf, self.momentum) if self.nesterov else buf
            jobs.append((p, rows, u))
        if not jobs:
            return
        rows0 = jobs[0][1]
        ortho = self.owners.run(
            jobs,
            gather=lambda job: job[1].gather_rows(job[2].to(self.ns_dtype)),
            compute=lambda job, full: newton_schulz(full, self.ns_steps, dtype=self.ns_dtype),
            result_shape=lambda job: job[1].shape,
            group=rows0.group if rows0.dist else None,
            device=rows0.local.device,
            dtype=self.ns_dtype,
        )
        lr = info.lr * self.lr_ratio
        for (p, rows, _u), o in zip(jobs, ortho):
            p_local = local_tensor(p.param.data)
            p_local.mul_(1 - lr * info.weight_decay)
            p_local.add_(rows.my_rows(o), alpha=-adjusted_lr(lr, self.adjust_lr, rows.shape))


class Muon(Method):
    name = "muon"
    summary = "momentum orthogonalized by Newton-Schulz on the hidden matrices; AdamW elsewhere"
    Config = MuonConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def selects(self, spec: ParamSpec) -> bool:
        return self.selects_any_shape(spec)

    def update_rule(self) -> MuonRule:
        c = self.config
        return MuonRule(
            self.name, momentum=c.momentum, nesterov=c.nesterov, ns_steps=c.ns_steps,
            adjust_lr=c.adjust_lr, lr_ratio=c.lr_ratio, ns_dtype=c.ns_dtype,
        )


@hookimpl
def register_methods(register):
    register(Muon)
