"""Adam-mini: Adam with one second moment per parameter block instead of per element.

Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", arXiv 2406.16793; the tests compare
against the package adam-mini 1.1.1 (``Adam_mini``) on the same gradients. The first moment stays
per element; the second moment ``v`` is the EMA of the MEAN of ``G^2`` over a block, and every element
of the block steps with ``lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``. The package's partition,
on torchtitan's LLaMA names:

* ``head_targets`` (query and key, ``wq``/``wk``): one block per attention head, i.e. per
  ``head_dim`` consecutive rows of the (heads * head_dim) x dim weight (the package's
  ``view(-1, dim * dim / n_heads)``);
* every other matrix (embedding: one block per token; output head, ``wv``, ``wo``, the MLP): one
  block per row (output neuron);
* 1-D parameters (norms): one block for the whole vector; biases (role ``bias``): plain Adam.

Decoupled weight decay ``W <- W (1 - lr wd)`` before the update, except on 1-D parameters and biases
(the package exempts names containing "norm", "ln" or "bias": on the LLaMA models here those are
exactly the norms).

The head size comes from the model description (``method.model``,
``slimtrain.registry.model_description``: hidden size / heads, inferred from torchtitan's model args
or a Hugging Face config, or given to ``slimtrain.prepare``); the section's ``head_dim`` is an
override, refused when it disagrees with a described head size, and needed only where no description
reached the method (a bare module, hand-built tests). Checked before training to divide the rows of
every ``head_targets`` weight. ``AdamMiniRule.head_dim_of(spec)`` is the one place that reads it.

FSDP2: ``m`` and the per-row ``v`` are row-sharded like the weight (no communication); a per-head
``v`` is replicated: each rank sums its rows' ``G^2`` into a vector of all m rows (zeros elsewhere),
one all-reduce of m numbers, then sums per head; a norm's ``v`` is one all-reduce of one number.
Memory: one moment per element plus one number per block (about half of AdamW's state).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import torch

from slimtrain.registry import Capability, ConfigError, Method, ParamSpec, check_range, hookimpl
from slimtrain.registry.sharded import RowShards
from slimtrain.registry.targets import matches_any
from slimtrain.registry.tensors import local_tensor
from slimtrain.registry.update_rule import OnReset, RuleParam, StateSpec, StepInfo, UpdateRule


@dataclasses.dataclass(frozen=True)
class AdamMiniConfig:
    head_dim: int | None = None  # rows per attention head of wq / wk; None: the model description's
    #                              dim / n_heads (set: an override, refused if it disagrees with the description)
    head_targets: tuple[str, ...] = ("wq", "wk")  # one v per head (the package's wqk_names)
    targets: tuple[str, ...] = ("*",)  # every trainable parameter, as the package
    roles: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        if self.head_dim is not None:
            check_range("adam_mini", "head_dim", self.head_dim, low=1)
        if not self.targets:
            raise ConfigError("[adam_mini] targets = () is empty; use ('*',) for every parameter")
        if not self.roles:
            raise ConfigError("[adam_mini] roles = () is empty; use ('*',) for every role")


class AdamMiniRule(UpdateRule):
    """Adam-mini's step (FSDP2: row-local, or one all-reduce of m numbers for per-head blocks)."""

    needs_matrix = False

    def __init__(self, method: str, *, head_dim: int | None, head_targets, model=lambda: None):
        self.method = method
        self._head_dim = None if head_dim is None else int(head_dim)
        self.head_targets = tuple(head_targets)
        self._model = model  # () -> the ModelDescription handed to the method (method.model), or None

    def head_dim_of(self, spec: ParamSpec) -> int:
        """Rows per head of ``spec``: the model description's hidden size / heads; the section's
        ``head_dim`` where none is described, and refused where it disagrees with it."""
        desc = self._model()
        described = desc.head_dim if desc is not None else None
        if self._head_dim is not None and described is not None and self._head_dim != described:
            raise ConfigError(
                f"[{self.method}] head_dim = {self._head_dim} disagrees with the model's head size {described} "
                f"(hidden size {desc.hidden_size} / {desc.num_heads} heads, from the {desc.source}): drop the key "
                f"(the description's is used) or set it to {described}"
            )
        if self._head_dim is not None:
            return self._head_dim
        if described is None:
            raise ConfigError(
                f"[{self.method}] head_dim is not set and the model's head size is unknown "
                f"({'no model description' if desc is None else 'its description from the ' + desc.source + ' lacks hidden size or heads'}); "
                f"set [{self.method}] head_dim = dim / n_heads, or pass description=ModelDescription(...) to slimtrain.prepare"
            )
        return described

    def kind(self, spec: ParamSpec) -> str:
        if spec.role == "bias":
            return "adam"
        if len(spec.shape) == 2:
            return "head" if matches_any(spec.module, self.head_targets) else "row"
        return "block"

    def check(self, spec: ParamSpec) -> None:
        if self.kind(spec) == "head":
            hd = self.head_dim_of(spec)
            if spec.shape[0] % hd:
                raise ConfigError(
                    f"[adam_mini] head_dim = {hd} does not divide the {spec.shape[0]} rows of {spec.name} "
                    f"(shape {tuple(spec.shape)}): the per-head blocks would not partition it; allowed: a "
                    f"divisor of {spec.shape[0]} (the model's dim / n_heads)"
                )

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        kind = self.kind(spec)
        layout = "rows" if spec.shape else "replicate"
        specs = [
            StateSpec("step", (), torch.float32, OnReset.ZERO, host=True, counter=True),
            StateSpec("m", spec.shape, None, OnReset.ZERO, moment=True, layout=layout),
        ]
        if kind == "adam":
            specs.append(StateSpec("v", spec.shape, None, OnReset.ZERO, moment=True, layout=layout))
        elif kind == "head":
            specs.append(StateSpec("vmean", (spec.shape[0] // self.head_dim_of(spec), 1), torch.float32, OnReset.ZERO))
        elif kind == "row":
            specs.append(StateSpec("vmean", (spec.shape[0], 1), torch.float32, OnReset.ZERO, layout="rows"))
        else:
            specs.append(StateSpec("vmean", (), torch.float32, OnReset.ZERO))
        return specs

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        for p in params:
            self._step_one(p, info)

    def _block_mean_sq(self, p: RuleParam, kind: str, rows: RowShards) -> torch.Tensor:
        g = rows.local
        if kind == "row":
            return torch.linalg.vector_norm(g, dim=1, keepdim=True).square_().div_(g.shape[1])
        if kind == "block":
            total = rows.allreduce(torch.sum(g * g).reshape(1))[0]
            return total / math.prod(rows.shape)
        hd = self.head_dim_of(p.spec)
        m, n = rows.shape
        if not rows.dist:
            return torch.mean((g * g).view(-1, hd * n), dim=1, keepdim=True)
        per_row = g.new_zeros(m)
        per_row[rows.row0 : rows.row0 + rows.rows] = (g * g).sum(dim=1)
        per_row = rows.allreduce(per_row)
        return (per_row.view(-1, hd).sum(dim=1, keepdim=True)) / (hd * n)

    def _step_one(self, p: RuleParam, info: StepInfo) -> None:
        kind = self.kind(p.spec)
        state = p.state
        rows = RowShards(p.grad)
        g = rows.local
        beta1, beta2 = info.betas
        p_local = local_tensor(p.param.data)
        m = local_tensor(state["m"])
        state["step"] += 1
        t = int(state["step"].item())
        if info.weight_decay > 0.0 and kind in ("head", "row"):
            p_local.mul_(1 - info.lr * info.weight_decay)
        bias1 = 1 - beta1**t
        bias2_sqrt = math.sqrt(1 - beta2**t)
        if kind == "adam":
            v = local_tensor(state["v"])
            g_m = g.to(m.dtype)
            v.mul_(beta2).addcmul_(g_m, g_m, value=1 - beta2)
            m.lerp_(g_m, 1 - beta1)
            h = (v.float().sqrt() / bias2_sqrt).add_(info.eps)
            p_local.addcdiv_(m.float().to(p_local.dtype), h.to(p_local.dtype), value=-info.lr / bias1)
            return
        vmean = local_tensor(state["vmean"])
        vmean.mul_(beta2).add_(self._block_mean_sq(p, kind, rows), alpha=1 - beta2)
        m.lerp_(g.to(m.dtype), 1 - beta1)
        h = (vmean.sqrt() / bias2_sqrt).add_(info.eps)
        stepsize = (1 / bias1) / h
        if kind == "head":
            hd = self.head_dim_of(p.spec)
            stepsize = rows.my_rows(stepsize.repeat_interleave(hd, dim=0))
        if m.dtype == p_local.dtype == stepsize.dtype:
            p_local.addcmul_(m, stepsize, value=-info.lr)
        else:
            p_local.add_((m.float() * stepsize * info.lr).to(p_local.dtype), alpha=-1)


class AdamMini(Method):
    name = "adam_mini"
    summary = "Adam with one second moment per block (per head for q/k, per row elsewhere): about half of AdamW's state"
    Config = AdamMiniConfig
    provides = frozenset({Capability.OPTIMIZER, Capability.MEMORY_ESTIMATE})

    def selects(self, spec: ParamSpec) -> bool:
        return (
            spec.trainable
            and matches_any(spec.module, self.config.targets)
            and any(fnmatch.fnmatchcase(spec.role, r) for r in self.config.roles)
        )

    def target_patterns(self) -> tuple[str, ...]:
        return tuple(self.config.targets)

    def update_rule(self) -> AdamMiniRule:
        c = self.config
        return AdamMiniRule(self.name, head_dim=c.head_dim, head_targets=c.head_targets, model=lambda: self.model)


@hookimpl
def register_methods(register):
    register(AdamMini)
