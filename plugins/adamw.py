"""Full-rank AdamW: the baseline, and the DEFAULT rule of every composition.

Every trainable parameter that no other optimizer method selects is routed to this rule, so an
optimizer method never re-implements AdamW for the parameters it does not own. The step is torch's
own functional AdamW (``torch.optim.adam.adam`` with decoupled weight decay) over all of a group's
parameters at once: ``foreach``/``fused`` kernels keep the many small parameters (norms, biases)
cheap, as ``optimizer.implementation`` asks. FSDP2: elementwise on each rank's row shard (state laid
out ``rows``, like the parameter); no communication.
"""

from __future__ import annotations

import dataclasses

import torch

from slimtrain.registry import Capability, Method, ParamSpec, hookimpl
from slimtrain.registry.update_rule import ElementwiseUpdate, OnReset, RuleParam, StateSpec, StepInfo, UpdateRule


def adamw_elementwise(param, grad, exp_avg, exp_avg_sq, scalars):
    """torch's (non-capturable) AdamW step of one parameter, written as a pure function: the same
    operations in the same order as ``torch.optim.adam``'s for-loop and foreach paths."""
    decay, w1, beta2, w2, bc2_sqrt, eps, neg_step_size = scalars.unbind(0)
    param = param * decay
    exp_avg = torch.lerp(exp_avg, grad, w1)
    exp_avg_sq = exp_avg_sq * beta2 + grad * grad * w2
    denom = exp_avg_sq.sqrt() / bc2_sqrt + eps
    param = param + neg_step_size * (exp_avg / denom)
    return param, exp_avg, exp_avg_sq


#: ``adamw_elementwise`` of one element in C (``ElementwiseUpdate.c_source``): the same operations in
#: the same order; torch's vectorized CPU ``lerp`` is one fused multiply-add (``fma(w, end - start,
#: start)`` for a weight below 0.5, else ``fma(w - 1, end - start, end)``), so this one is too
ADAMW_C = r"""
static inline void update(float* p, float g, float* mom, const float* s) {
    const float decay = s[0], w1 = s[1], beta2 = s[2], w2 = s[3], bc2_sqrt = s[4], eps = s[5], neg = s[6];
    float param = *p * decay;
    const float m = mom[0], d = g - m;
    mom[0] = std::fabs(w1) < 0.5f ? std::fma(w1, d, m) : std::fma(w1 - 1.0f, d, g);
    const float gg = g * g;
    mom[1] = mom[1] * beta2 + gg * w2;
    const float denom = std::sqrt(mom[1]) / bc2_sqrt + eps;
    *p = param + neg * (mom[0] / denom);
}
"""


def adamw_scalars(item: RuleParam, info: StepInfo) -> torch.Tensor:
    """Advance the step count; the step's scalars as torch's Adam computes them (in double)."""
    step_t = item.state["step"]
    step_t += 1
    step = float(step_t)
    beta1, beta2 = info.betas
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    values = [1 - info.lr * info.weight_decay, 1 - beta1, beta2, 1 - beta2, bc2_sqrt, info.eps, -(info.lr / bc1)]
    return torch.tensor(values, dtype=torch.float32, device=item.param.device if not hasattr(item.param, "to_local")
                        else item.param.to_local().device)

@dataclasses.dataclass(frozen=True)
class AdamWConfig:
    """AdamW takes its hyperparameters from the trainer's [optimizer] section."""


class AdamWRule(UpdateRule):
    """torch.optim.AdamW's step (same kernels, same numbers) on the parameters routed here."""

    needs_matrix = False
    any_placement = True  # elementwise: any shard of any placement (TP's column shards too)

    def __init__(self, method: str = "adamw", implementation: str = "foreach"):
        self.method = method
        self.implementation = implementation

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        # torch's fused kernels read the step on the parameter's device, the others on the host
        host = self.implementation != "fused"
        layout = "rows" if spec.shape else "replicate"
        return [
            StateSpec("step", (), torch.float32, OnReset.ZERO, host=host, counter=True),
            StateSpec("exp_avg", spec.shape, None, OnReset.ZERO, moment=True, layout=layout),
            StateSpec("exp_avg_sq", spec.shape, None, OnReset.ZERO, moment=True, non_negative=True, layout=layout),
        ]

    def elementwise_update(self, spec: ParamSpec) -> ElementwiseUpdate:
        """The fusable form of ``step`` (``state_8bit`` fuses it with its decode and encode)."""
        return ElementwiseUpdate(adamw_elementwise, ("exp_avg", "exp_avg_sq"), adamw_scalars, ADAMW_C)

    def step_temporaries(self, specs: list[ParamSpec]) -> int:
        """Elements torch's Adam allocates stepping ``specs`` at once (the device memory model):
        ``foreach``: one group-sized ``exp_avg_sq.sqrt()``; ``for-loop``: one parameter's; ``fused``: none."""
        if self.implementation == "fused":
            return 0
        if self.implementation == "foreach":
            return sum(s.numel for s in specs)
        return max(s.numel for s in specs)

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        from torch.optim.adam import adam

        beta1, beta2 = info.betas
        adam(
            [p.param for p in params], [p.grad for p in params],
            [p.state["exp_avg"] for p in params], [p.state["exp_avg_sq"] for p in params], [],
            [p.state["step"] for p in params],
            foreach=self.implementation == "foreach", fused=True if self.implementation == "fused" else None,
            decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=info.lr,
            weight_decay=info.weight_decay, eps=info.eps, maximize=False,
        )


class AdamW(Method):
    name = "adamw"
    summary = "full-rank AdamW on every trainable parameter no other optimizer method selects (the default)"
    Config = AdamWConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def target_patterns(self) -> tuple[str, ...]:
        return ("*",)

    def target_roles(self) -> tuple[str, ...]:
        return ("*",)

    def selects(self, spec: ParamSpec) -> bool:
        return spec.trainable

    def update_rule(self) -> AdamWRule:
        return AdamWRule(self.name)


@hookimpl
def register_methods(register):
    register(AdamW)
