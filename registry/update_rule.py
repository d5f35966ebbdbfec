"""The update-rule contract: how an optimizer method updates the parameters it selects.

Why rules and not optimizers: the composition builds ONE ``torch.optim.Optimizer`` per model part
(``slimtrain.registry.composed_optimizer.ComposedOptimizer``) and routes every parameter to the rule of the
method that selected it (``adamw``'s rule for the rest). So several optimizer methods can share a
recipe on disjoint parameters, a rule never re-implements AdamW for parameters it does not own, and
the memory estimate, momentum reset, checkpointing and 8-bit state read the rule's *declared* state
instead of guessing from key names.

A rule declares its state per parameter (``state_specs``); the optimizer creates every declared
tensor before the first step (dtype, initial value and FSDP2 layout from the declaration), keeps it
in that dtype through ``load_state_dict``, and refuses state the rule did not declare.
"""

from __future__ import annotations

import dataclasses
import math
import enum
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

if TYPE_CHECKING:
    from slimtrain.registry.method import ParamSpec

__all__ = ["LAYOUTS", "ElementwiseUpdate", "OnReset", "RuleParam", "StateSpec", "StepInfo", "UpdateRule"]

#: how a non-scalar state tensor is laid out under FSDP2 (see ``StateSpec.layout``)
LAYOUTS = ("rows", "replicate")


class OnReset(str, enum.Enum):
    """What a momentum reset (``ComposedOptimizer.reset_state``) does to one state tensor."""

    ZERO = "zero"  # zeroed (Adam moments, the per-parameter step count)
    KEEP = "keep"  # untouched (projections, seeds)
    INIT = "init"  # back to StateSpec.init_value (Fira's limiter: -1.0)


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """One state tensor a rule keeps for one parameter."""

    name: str  # key in optimizer.state[param]
    shape: tuple[int, ...]  # GLOBAL shape; () for a scalar
    dtype: torch.dtype | None = None  # None: the parameter's dtype; fp32 projections say float32
    on_reset: OnReset = OnReset.ZERO
    moment: bool = False  # a moment-like tensor: a state codec (8-bit state) may store it encoded
    non_negative: bool = False  # never below 0 (a second moment): a codec may use an unsigned map
    layout: str = "replicate"  # under FSDP2: "rows" (Shard(0), rows follow the parameter's rows)
    #                            or "replicate" (identical on every rank); scalars replicate
    init_value: float = 0.0  # value at creation and for OnReset.INIT
    host: bool = False  # a scalar kept on the CPU (a step count torch's non-fused kernels read there)
    counter: bool = False  # a per-parameter step count (momentum_reset's reset_step = false keeps it)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "on_reset", OnReset(self.on_reset))
        except ValueError:
            allowed = ", ".join(r.value for r in OnReset)
            raise ValueError(
                f"state {self.name!r}: on_reset = {self.on_reset!r} is not a reset policy; allowed: {allowed}"
            ) from None
        if self.layout not in LAYOUTS:
            raise ValueError(f"state {self.name!r}: layout = {self.layout!r}; allowed: {', '.join(LAYOUTS)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What every rule sees, the same way for every rule (one per param group per step)."""

    step: int  # the TRUE 1-based global step, also after a resume
    lr: float  # this group's scheduled LR (schedule x LR factors)
    betas: tuple[float, float]
    eps: float
    weight_decay: float


@dataclasses.dataclass
class RuleParam:
    """One parameter handed to ``UpdateRule.step``."""

    name: str  # canonical FQN (no FSDP/AC wrapper prefixes)
    spec: ParamSpec  # role, GLOBAL shape, owning parametrization method
    param: torch.Tensor  # nn.Parameter, maybe a Shard(0) DTensor under FSDP2
    grad: torch.Tensor
    state: dict[str, torch.Tensor]  # created from the declarations before the first step
    index: int = 0  # position of the parameter in its group (stable: seeds may use it)
    group_index: int = 0  # position of its group in the optimizer (stable)
    #: per-layer updates with gradient accumulation, for a rule that declares ``accumulation_specs``:
    #: the buffers ``accumulate`` filled over the step's micro-batches (``grad`` is then the LAST
    #: micro-batch's gradient alone) and the number of micro-batches; None / 1 otherwise
    accumulated: dict[str, torch.Tensor] | None = None
    micro_batches: int = 1


@dataclasses.dataclass(frozen=True)
class ElementwiseUpdate:
    """A rule's update of ONE parameter as a pure elementwise function, which a state codec may fuse
    with its decode and encode (``state_8bit``: one compiled kernel instead of ~20 passes).

    ``fn(param, grad, *moments, scalars) -> (param, *moments)``: new values, nothing written in place,
    every tensor fp32 and of the same shape, only elementwise operations (no reductions, no
    indexing across elements), ``scalars`` a 1-D fp32 tensor (values that change per step travel there,
    so a compiled graph does not bake them in). ``moments`` names the state keys ``fn`` takes and returns,
    in order. ``scalars_for(item, info)`` advances the rule's own counters in ``item.state`` (e.g.
    AdamW's step) and returns the tensor; it runs once per parameter per step, fused or not."""

    fn: Callable[..., tuple[torch.Tensor, ...]]
    moments: tuple[str, ...]
    scalars_for: Callable[["RuleParam", "StepInfo"], torch.Tensor]
    #: optional: the same update of ONE element in C, ``static inline void update(float* p, float g,
    #: float* mom, const float* s)`` (``mom[i]`` the i-th of ``moments``, updated in place; ``s`` the
    #: scalars). A codec may compile it into a hand-written CPU loop (``slimtrain.registry.quant8_cpu``:
    #: decode, update and encode in one pass), where torch.compile's CPU code is several passes.
    c_source: str = ""


class UpdateRule:
    """Base class of the update rule an OPTIMIZER method returns from ``Method.update_rule``.

    Subclasses set ``method``, declare their state and implement ``step``; the docstring of each
    rule says which FSDP2 pattern it uses (elementwise on the local shard; ``slimtrain.registry.sharded.
    RowShards`` all-reduce of a small product; or ``slimtrain.registry.sharded.OwnerRanks`` for whole-matrix math).
    """

    method: str = ""  # the owning method's name (errors name it)
    needs_matrix: ClassVar[bool] = True  # refuse non-2-D parameters (error names method + param)
    #: True for a rule that is elementwise on whatever shard it is given (AdamW): under tensor
    #: parallelism it steps the TP shards as they are (row-wise Linears shard the weight's COLUMNS).
    #: Rules built on ``RowShards`` / ``OwnerRanks`` need whole rows and keep False: the optimizer
    #: then hands them a TP-sharded parameter's row view (``slimtrain.registry.sharded.row_view``).
    any_placement: ClassVar[bool] = False
    #: the trainer's ``optimizer.implementation`` ("foreach", "fused" or "for-loop"), set by the
    #: composition before the first step; rules with batched kernels honour it
    implementation: str = "foreach"

    def elementwise_update(self, spec: ParamSpec) -> ElementwiseUpdate | None:
        """This rule's step of ``spec`` as a pure elementwise function a codec may fuse (see
        ``ElementwiseUpdate``), or None (default: the codec decodes, ``step`` runs, the codec encodes).
        A rule that returns one must give the same update as its ``step`` of a list of one."""
        return None

    def accumulation_specs(self, spec: ParamSpec) -> list[StateSpec] | None:
        """Where this rule accumulates a step's micro-batch gradients when a stepper steps in backward
        (per-layer updates with gradient accumulation). None (default): the full gradient, summed into
        ``p.grad`` by autograd / FSDP2 and alive between micro-batches. A list: buffers, declared like
        state (GLOBAL shape, dtype, FSDP2 layout), that ``accumulate`` folds each micro-batch's gradient
        into; that gradient is then freed, the buffers live only within the step, and ``step`` reads
        them from ``RuleParam.accumulated`` (e.g. a projected rule's r x n ``P^T G``). The memory models
        count these buffers instead of the gradient."""
        return None

    def accumulate(self, item: RuleParam, buffers: dict[str, torch.Tensor], micro: int, info: StepInfo) -> None:
        """Fold ``item.grad`` (micro-batch ``micro`` of the step, 0-based; ``buffers`` is empty at 0:
        create every declared buffer, as plain tensors on the gradient's local device) into
        ``buffers``. ``item.state`` holds the state no codec stores (projections, counters), not the
        moments. A rule whose ``step`` would refresh something from the gradient makes its choice here
        (e.g. from micro-batch 0's gradient), before the first fold."""
        raise NotImplementedError(f"{type(self).__name__} declares accumulation_specs but implements no accumulate")

    def state_specs(self, spec: ParamSpec) -> list[StateSpec]:
        """The state this rule keeps for ``spec`` (GLOBAL shapes), created before the first step."""
        raise NotImplementedError(f"{type(self).__name__} declares no state_specs")

    def step(self, params: list[RuleParam], info: StepInfo) -> None:
        """Update every ``p.param`` in place. Called once per param group per optimizer step with
        all of the group's parameters that have a gradient (a rule may batch: foreach kernels, or
        exact SVDs spread over ranks); must also work on a list of one (per-layer updates)."""
        raise NotImplementedError(f"{type(self).__name__} implements no step")

    def check(self, spec: ParamSpec) -> None:
        """Refuse a parameter this rule cannot update (before training). Default: ``needs_matrix``
        rules take 2-D parameters only. Raise ``ConfigError`` naming ``self.method`` and ``spec.name``."""
        if self.needs_matrix and len(spec.shape) != 2:
            from slimtrain.registry.errors import ConfigError

            raise ConfigError(
                f"[{self.method}] selects {spec.name} with shape {tuple(spec.shape)}, but its update rule "
                f"needs a matrix (2-D parameter); narrow `targets`/`roles` to 2-D weights"
            )

    def state_elements(self, spec: ParamSpec) -> int:
        """State elements kept for ``spec`` (the memory estimate): the declared tensors' sizes.
        Scalars (step counts, limiters) are bookkeeping, not state the paper's model counts."""
        return sum(s.numel for s in self.state_specs(spec) if s.shape)
