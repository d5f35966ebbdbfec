"""SCALE: SGD with column-wise gradient normalization, first-order momentum on the last layer only.

Glentis et al., arXiv 2506.16659 (code: OptimAI-Lab/Minimalist_LLM_Pretraining, ``SCALE``). For every
selected matrix the update is the gradient divided, per column of the math's ``x W`` layout, by its
root mean square: for torch's ``(out, in)`` Linear weights that is per ROW (``mean(G^2, dim=1)``); for
the embedding ``(vocab, dim)`` per embedding dimension (``dim=0``). The last layer (``momentum_layers``,
the output head) first takes an EMA momentum ``M <- mu M + (1 - mu) G`` and normalizes M. Then
``W <- W (1 - lr wd) - lr * G / max(rms, 1e-8)``. Norms (1-D) go to the default AdamW rule.

Conventions of the released code kept here (the test states them next to the paper's algorithm):
the RMS (not the Euclidean norm: a factor ``sqrt(n)`` in the LR), the 1e-8 floor on the RMS, the EMA
(``lerp``) form of the momentum, weight decay before the update with the scheduled LR. ``lr_ratio``
multiplies the trainer's LR for SCALE's matrices (the code's 1B run: SCALE at 2e-4, Adam on the norms
at ``adam_lr`` 1e-3, i.e. trainer LR 1e-3 and lr_ratio 0.2).

FSDP2: a Linear weight's rows are local to its row shard (no communication); the embedding's per
column statistics are one all-reduce of ``dim`` numbers (``RowShards.allreduce``). Memory: no state,
except the momentum of the last layer (vocab x dim).
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch

from slimtrain.registry import DEFAULT_TARGETS, Capability, ConfigError, Method, ParamSpec, check_range, hookimpl
from slimtrain.registry.sharded import RowShards
from slimtrain.registry.targets import matches_any
from slimtrain.registry.tensors import local_tensor
from slimtrain.registry.update_rule import OnReset, RuleParam, StateSpec, StepInfo, UpdateRule

RMS_FLOOR = 1e-8


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    momentum: float = 0.9  # the last layer's EMA momentum
    lr_ratio: float = 1.0
    targets: tuple[str, ...] = DEFAULT_TARGETS + ("output",)  # Linear weights SCALE updates
    embeddings: tuple[str, ...] = ("tok_embeddings",)  # embedding weights (normalized over the vocab)
    momentum_layers: tuple[str, ...] = ("output",)  # the "last layer": momentum before normalizing
    roles: tuple[str, ...] = ("weight",)

    def __post_init__(self) -> None:
        check_range("scale", "momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_range("scale", "lr_ratio", self.lr_ratio, low=0, low_inclusive=False)
        if not self.targets and not self.embeddings:
            raise ConfigError("[scale] targets = () and embeddings = (): SCALE would update nothing")
        if not self.roles:
            raise ConfigError("[scale] roles = () is empty; name at least one parameter role, e.g. 'weight'")


def rms_normalize(g: torch.Tensor, dim: int, rows: RowShards | None = None) -> torch.Tensor:
    """``g / max(sqrt(mean(g^2, dim)), 1e-8)``; ``rows`` given when ``dim = 0`` runs over rows
    spread across ranks (the mean's sum is then one all-reduce of n numbers)."""
    if dim == 1 or rows is None:
        rms = g.square().mean(dim=dim, keepdim=True)
    else:
        rms = rows.allreduce(g.square().sum(dim=0, keepdim=True)) / rows.shape[0]
    return g / rms.sqrt().clamp_min(RMS_FLOOR)


class ScaleRule(UpdateRule):
    """SCALE's step: row-local normalization for Linear weights, one small all-reduce for embeddings."""

    def __init__(self, method: str, *, momentum: float, lr_ratio: float, embeddings, momentum_layers):
        self.method = method
        self.momentum, self.lr_ratio = float(momentum), float(lr_ratio)
        self.embeddings, self.momentum_layers = tuple(embeddings), tuple(momentum_layers)

    def has_momentum(self, spec: ParamSpec) -> bool:
        return matches_any(spec.module, self.momentum_layers)

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        if self.has_momentum(spec):
            return [StateSpec("moment1", spec.shape, None, OnReset.ZERO, moment=True, layout="rows")]
        return []

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        lr = info.lr * self.lr_ratio
        for p in params:
            rows = RowShards(p.grad)
            g = rows.local
            if self.has_momentum(p.spec):
                buf = local_tensor(p.state["moment1"])
                buf.lerp_(g.to(buf.dtype), 1 - self.momentum)
                g = buf.float()
            dim = 0 if (not p.spec.is_linear and matches_any(p.spec.module, self.embeddings)) else 1
            u = rms_normalize(g, dim, rows)
            p_local = local_tensor(p.param.data)
            p_local.mul_(1 - lr * info.weight_decay)
            p_local.add_(u.to(p_local.dtype), alpha=-lr)


class Scale(Method):
    name = "scale"
    summary = "SGD with column-wise gradient normalization; momentum on the last layer only"
    Config = ScaleConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def target_patterns(self) -> tuple[str, ...]:
        return tuple(self.config.targets) + tuple(self.config.embeddings)

    def selects(self, spec: ParamSpec) -> bool:
        """The Linear weights of ``targets`` plus the (non-Linear) embedding weights of ``embeddings``."""
        if self.selects_any_shape(spec):
            return True
        return (
            spec.trainable
            and not spec.is_linear
            and len(spec.shape) == 2
            and any(fnmatch.fnmatchcase(spec.role, role) for role in self.target_roles())
            and matches_any(spec.module, self.config.embeddings)
        )

    def update_rule(self) -> ScaleRule:
        c = self.config
        return ScaleRule(
            self.name, momentum=c.momentum, lr_ratio=c.lr_ratio, embeddings=c.embeddings,
            momentum_layers=c.momentum_layers,
        )


@hookimpl
def register_methods(register):
    register(Scale)
