"""Stable-SPAM: AdamW with adaptive spike-aware clipping and adaptive gradient-norm scaling.

Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam", arXiv 2502.17055;
the tests compare against the released code (TianjinYellow/StableSPAM, ``galore_torch/stablespam.py``)
on the same gradients. Per parameter, with its own step count t:

1. decoupled weight decay first: ``W <- W (1 - lr wd)``;
2. AdaClip: ``M <- g3 M + (1 - g3) max|G|``, ``T = M / (1 - g3^t)``; entries with ``|G| > T`` become
   ``G / max|G| * T`` (``gamma3``, the threshold's EMA coefficient);
3. AdaGN: ``m <- g1 s m + (1 - g1 s) ||G||``, ``v <- g2 v + (1 - g2) ||G||^2``, then
   ``G <- G / ||G|| * (m / (1 - (g1 s)^t)) / (sqrt(v / (1 - g2^t)) + eps)`` (when ``||G|| > 0``);
4. Adam on that G with ``beta1 s`` in place of beta1 and the usual bias corrections.

``s`` is the released code's cosine factor over ``total_T`` steps, from 1 down to ``eta_min``
(``eta_min + (1 - eta_min)(1 + cos(pi t_global / (total_T + 1))) / 2``); ``total_T = 0`` keeps s = 1.
It multiplies gamma1 and beta1 (the released code's default run: total_T = the training steps).

Momentum reset (MoRet, the released ``update_proj_gap``) is NOT in this rule: compose the
``momentum_reset`` method (``every`` = the interval, ``warmup_steps = 0``, ``reset_step = true``), which
zeroes ``exp_avg``, ``exp_avg_sq`` and the step count after step s with ``s % every == 0`` — when the
released code does too — and keeps the AdaClip/AdaGN statistics (declared ``KEEP``), as the released
code does. Where the arithmetic differs (docs/methods/stable-spam-sinkgd-adam-mini.md):

* the reset step itself: the released code sets its step count to 1 BEFORE the Adam update of step
  s, while its moments are still the old ones (it rebinds new zero tensors in the state but updates
  the old ones it already holds), so step s's update is the old moments with the bias corrections
  of step 1. Here step s is an ordinary Adam step (count t). ``momentum_reset`` runs after the step
  and cannot reach into it.
* after the reset the released count restarts at 2 (1 + the increment); momentum_reset zeroes it to 0.
  This rule adds 1 to its count once a reset has happened (``total_steps`` > ``step``, a KEEP counter),
  so from step s + 1 on the two are the same arithmetic again: the only difference left is step s's.

FSDP2: elementwise on each rank's row shard; ``max|G|`` is one MAX all-reduce and ``||G||^2`` one SUM
all-reduce of one number each. Memory: AdamW's (two moments per element) plus 5 scalars per parameter.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from slimtrain.registry import Capability, ConfigError, Method, ParamSpec, check_range, hookimpl
from slimtrain.registry.sharded import RowShards
from slimtrain.registry.tensors import local_tensor
from slimtrain.registry.update_rule import OnReset, RuleParam, StateSpec, StepInfo, UpdateRule


@dataclasses.dataclass(frozen=True)
class StableSpamConfig:
    gamma1: float = 0.85  # AdaGN's EMA of ||G|| (released BF16 script: 0.85; its README/FP4 runs: 0.7)
    gamma2: float = 0.99999  # AdaGN's EMA of ||G||^2 (released BF16 script; README: 0.9)
    gamma3: float = 0.999  # AdaClip's EMA of max|G| (the clipping threshold), every released run
    total_T: int = 0  # the released total_T: steps of the cosine factor on gamma1/beta1; 0 = off
    eta_min: float = 0.5  # the cosine factor's end value (released default)
    targets: tuple[str, ...] = ("*",)  # every trainable parameter, as the released code
    roles: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        for key in ("gamma1", "gamma2", "gamma3"):
            check_range("stable_spam", key, getattr(self, key), low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_range("stable_spam", "total_T", self.total_T, low=0)
        check_range("stable_spam", "eta_min", self.eta_min, low=0.0, high=1.0, low_inclusive=False)
        if not self.targets:
            raise ConfigError("[stable_spam] targets = () is empty; use ('*',) for every parameter")
        if not self.roles:
            raise ConfigError("[stable_spam] roles = () is empty; use ('*',) for every role")


def cosine_factor(step: int, total_T: int, eta_min: float) -> float:
    """The released code's ``CosineDecay(1.0, total_T, eta_min).get_dr(step)`` in closed form."""
    if total_T <= 0:
        return 1.0
    return eta_min + (1.0 - eta_min) * (1 + math.cos(math.pi * step / (total_T + 1))) / 2


class StableSpamRule(UpdateRule):
    """Stable-SPAM's step (FSDP2: elementwise, two one-number all-reduces per parameter)."""

    needs_matrix = False

    def __init__(self, method: str, *, gamma1: float, gamma2: float, gamma3: float, total_T: int, eta_min: float):
        self.method = method
        self.gamma1, self.gamma2, self.gamma3 = float(gamma1), float(gamma2), float(gamma3)
        self.total_T, self.eta_min = int(total_T), float(eta_min)

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        layout = "rows" if spec.shape else "replicate"
        scalar = dict(dtype=torch.float32, on_reset=OnReset.KEEP)
        return [
            StateSpec("step", (), torch.float32, OnReset.ZERO, host=True, counter=True),
            StateSpec("total_steps", (), torch.float32, OnReset.KEEP, host=True),
            StateSpec("exp_avg", spec.shape, None, OnReset.ZERO, moment=True, layout=layout),
            StateSpec("exp_avg_sq", spec.shape, None, OnReset.ZERO, moment=True, layout=layout),
            StateSpec("clip_max", (), **scalar),  # AdaClip's EMA of max|G|
            StateSpec("norm_m", (), **scalar),  # AdaGN's EMA of ||G||
            StateSpec("norm_v", (), **scalar),  # AdaGN's EMA of ||G||^2
        ]

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        scale = cosine_factor(info.step, self.total_T, self.eta_min)
        for p in params:
            self._step_one(p, info, scale)

    def _step_one(self, p: RuleParam, info: StepInfo, scale: float) -> None:
        import torch.distributed as dist

        state = p.state
        rows = RowShards(p.grad) if p.grad.dim() else None
        g = rows.local if rows is not None else p.grad.detach().float()
        p_local = local_tensor(p.param.data)
        p_local.mul_(1 - info.lr * info.weight_decay)

        # the count: +1 after a momentum reset (the released code restarts at 2, see the docstring)
        state["step"] += 1
        state["total_steps"] += 1
        t = int(state["step"].item()) + (1 if state["total_steps"].item() > state["step"].item() else 0)

        a = g.abs()
        max_g = a.max() if g.numel() else g.new_zeros(())
        if rows is not None and rows.dist:
            dist.all_reduce(max_g, op=dist.ReduceOp.MAX, group=rows.group)
        clip_max = state["clip_max"]
        clip_max.mul_(self.gamma3).add_((1 - self.gamma3) * max_g)
        threshold = clip_max / (1 - self.gamma3**t)
        # spiked entries (|G| > threshold) become G / max|G| * threshold: one factor for all of them
        g = torch.where(a > threshold, g * (threshold / max_g), g)
        del a

        sq = torch.linalg.vector_norm(g).square()
        if rows is not None:
            sq = rows.allreduce(sq.reshape(1))[0]
        norm = sq.sqrt()
        g1 = self.gamma1 * scale
        norm_m, norm_v = state["norm_m"], state["norm_v"]
        norm_m.mul_(g1).add_((1 - g1) * norm)
        norm_v.mul_(self.gamma2).add_((1 - self.gamma2) * norm**2)
        m_hat = norm_m / (1 - g1**t)
        v_hat = norm_v / (1 - self.gamma2**t)
        c = m_hat / (torch.sqrt(v_hat) + info.eps)
        g.mul_(torch.where(norm > 0, c / norm, torch.ones_like(norm)))  # AdaGN: G to norm c

        beta1, beta2 = info.betas
        beta1 = beta1 * scale
        bias1, bias2 = 1 - beta1**t, 1 - beta2**t
        exp_avg, exp_avg_sq = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])
        g_m = g.to(exp_avg.dtype)
        exp_avg.lerp_(g_m, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g_m, g_m, value=1 - beta2)
        # m / (sqrt(v) / sqrt(bc2) + eps) = sqrt(bc2) m / (sqrt(v) + eps sqrt(bc2))
        root2 = math.sqrt(bias2)
        denom = exp_avg_sq.sqrt().add_(info.eps * root2)
        if p_local.dtype == exp_avg.dtype:
            p_local.addcdiv_(exp_avg, denom, value=-info.lr * root2 / bias1)
        else:
            p_local.add_((exp_avg.float() / denom.float()).to(p_local.dtype), alpha=-info.lr * root2 / bias1)


class StableSpam(Method):
    name = "stable_spam"
    summary = "AdamW with adaptive spike-aware clipping and gradient-norm scaling (compose momentum_reset for MoRet)"
    Config = StableSpamConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def selects(self, spec: ParamSpec) -> bool:
        import fnmatch

        from slimtrain.registry.targets import matches_any

        return (
            spec.trainable
            and matches_any(spec.module, self.config.targets)
            and any(fnmatch.fnmatchcase(spec.role, r) for r in self.config.roles)
        )

    def target_patterns(self) -> tuple[str, ...]:
        return tuple(self.config.targets)

    def update_rule(self) -> StableSpamRule:
        c = self.config
        return StableSpamRule(
            self.name, gamma1=c.gamma1, gamma2=c.gamma2, gamma3=c.gamma3, total_T=c.total_T, eta_min=c.eta_min,
        )


@hookimpl
def register_methods(register):
    register(StableSpam)
