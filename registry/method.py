"""The method data model: what a method is, what it can provide, and what it needs.

A method is a ``Method`` subclass with a ``name``, a ``Config`` dataclass and a set of
``Capability`` flags saying which of the optional hooks below it implements. The composition
(``slimtrain.registry.composition``) only calls the hooks a method declares, in a fixed, documented order.

All hooks work on plain ``torch.nn`` modules and tensors (DTensors under FSDP2); nothing here knows
torchtitan, so methods can be unit-tested on small models and reused by other trainers.
"""

from __future__ import annotations

import dataclasses
import math
import enum
from typing import TYPE_CHECKING, Any, ClassVar

from slimtrain.registry.config import EmptyConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from slimtrain.registry.composed_optimizer import StateCodec
    from slimtrain.registry.master_weights import MasterWeights
    from slimtrain.registry.model_description import ModelDescription
    from slimtrain.registry.parametrization import LinearParametrization
    from slimtrain.registry.update_rule import UpdateRule


class Capability(str, enum.Enum):
    """What a method contributes. A method declares every capability whose hooks it implements."""

    PARAMETRIZATION = "parametrization"  # replaces selected Linear weights (make_parametrization)
    FACTORIZED = "factorized"  # ... by factors B (m x r), A (r x n) and a scale (refactorization needs it)
    FROZEN_BASE = "frozen_base"  # ... keeping a frozen dense base W0 that factors can merge into
    OPTIMIZER = "optimizer"  # an update rule for the params it selects (update_rule); one per parameter
    PARAM_GROUPS = "param_groups"  # adds options to the param groups of selected params
    STEP_HOOK = "step_hook"  # acts after optimizer steps (after_step), e.g. every N steps
    LR_SCHEDULE = "lr_schedule"  # multiplies the scheduled learning rate (lr_factor)
    STATE_CODEC = "state_codec"  # a memory layer: stores declared optimizer state its own way (state_codec)
    STEPPER = "stepper"  # a memory layer: decides WHEN the composed optimizer steps (attach_stepper)
    MASTER_WEIGHTS = "master_weights"  # a memory layer: stores the parameters in a low-precision dtype plus
    #                                    what restores the full-precision master weight (master_weights)
    MEMORY_ESTIMATE = "memory_estimate"  # derived: declared exactly by PARAMETRIZATION/OPTIMIZER methods,
    #                                      whose param_specs / rule state the analytic estimate reads


class HookStage(enum.IntEnum):
    """Order of step hooks within one step: weights are rewritten before optimizer state is reset,
    so a reset that follows a merge or refactorization sees the new factors. A step hook at the
    ``WEIGHTS`` stage writes parameters outside the optimizer step (``writes_weights_outside_step``):
    a master-weights layer, whose stored correction must match the stored weight, refuses it."""

    WEIGHTS = 10
    OPTIMIZER_STATE = 20


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A capability that some *other* method in the composition must provide."""

    capability: Capability
    why: str  # completes "refactorization requires ...": e.g. "a factorized parametrization"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter as the composition sees it, on a real model or from shapes alone.

    ``module`` is the fully qualified name of the owning module, ``role`` is ``"weight"``/``"bias"``
    for plain parameters or the role a parametrization gives its originals (``"B"``, ``"A"``,
    ``"S"``, ``"W0"``); ``method`` names the parametrizing method, if any. ``shape`` is the global
    (unsharded) shape.
    """

    name: str
    module: str
    role: str
    shape: tuple[int, ...]
    trainable: bool = True
    method: str | None = None
    is_linear: bool = False  # owned by an nn.Linear (or a parametrized one)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class OptimizerHyper:
    """The trainer's optimizer settings that every optimizer method honours."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    implementation: str = "foreach"  # "foreach", "fused" or "for-loop"


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """The trainer settings a memory layer may be unable to honour, read from the job config before
    any model is built (``Method.check_trainer``) and handed to ``Method.attach_stepper``.

    ``max_norm``: the global gradient-norm clipping bound; ``<= 0`` (and ``inf``) mean no clipping
    (the trainer never clips every gradient to zero). ``grad_accumulation_steps``: micro-batches
    (backward passes) per optimizer step."""

    max_norm: float = 0.0
    grad_accumulation_steps: int = 1

    @property
    def clips(self) -> bool:
        """Whether the trainer clips by the global gradient norm."""
        return math.isfinite(self.max_norm) and self.max_norm > 0


@dataclasses.dataclass
class StepContext:
    """Handed to step hooks after each optimizer step; ``step`` is the true 1-based step number,
    also after a resume, so "every N steps" schedules survive checkpoints without their own state."""

    step: int
    model_parts: list[Any]
    optimizers: list[Any]


class Method:
    """Base class of every method. Subclasses set the class attributes and implement the hooks of
    the capabilities they declare; the base implementations raise so a missing hook is loud."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    provides: ClassVar[frozenset[Capability]] = frozenset()
    requires: ClassVar[tuple[Requirement, ...]] = ()
    conflicts_with: ClassVar[frozenset[str]] = frozenset()
    hook_stage: ClassVar[HookStage] = HookStage.WEIGHTS
    #: the sizes of the model being trained (``slimtrain.registry.model_description``), set by
    #: ``Composition.describe_model`` before any parametrization; None until then
    model: ModelDescription | None = None
    #: STEPPER methods: whether the stepper steps each parameter inside backward as its gradient is
    #: ready and frees it (the memory models then count one parameter's gradient and step at a time)
    steps_in_backward: ClassVar[bool] = False
    #: PARAMETRIZATION methods: whether its parametrizations declare ``tp_dims`` (how each original
    #: follows a tensor-parallel plan); without it tensor parallelism is refused before the model
    tensor_parallel: ClassVar[bool] = False

    def __init__(self, config: Any | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # -- selection, shared by parametrizations, param groups and optimizers -------------------
    def target_patterns(self) -> tuple[str, ...]:
        """Module-name patterns this method acts on (``config.targets`` by convention)."""
        return tuple(getattr(self.config, "targets", ()))

    def target_roles(self) -> tuple[str, ...]:
        """Which parameter roles of a targeted module this method acts on (optimizer methods)."""
        return tuple(getattr(self.config, "roles", ("weight",)))

    def selects(self, spec: ParamSpec) -> bool:
        """Whether an optimizer/param-group hook of this method applies to ``spec`` (2-D only)."""
        return len(spec.shape) == 2 and self.selects_any_shape(spec)

    def selects_any_shape(self, spec: ParamSpec) -> bool:
        """``selects`` without its 2-D filter: a rule that overrides ``selects`` with this lets a
        non-matrix parameter its ``roles`` name (e.g. a bias) reach the rule's ``check`` and fail
        before training, naming it, instead of going to AdamW in silence."""
        import fnmatch

        from slimtrain.registry.targets import matches_any

        return (
            spec.trainable
            and spec.is_linear
            and any(fnmatch.fnmatchcase(spec.role, role) for role in self.target_roles())
            and matches_any(spec.module, self.target_patterns())
        )

    # -- PARAMETRIZATION ----------------------------------------------------------------------
    def make_parametrization(self, linear: nn.Linear, fqn: str) -> LinearParametrization:
        """Return the parametrization for ``linear.weight`` (called on the meta device, before
        sharding). Validate shapes here and raise ConfigError naming ``fqn`` and its shape."""
        raise NotImplementedError(f"{self.name} declares no parametrization")

    def param_specs(self, module: str, shape: tuple[int, int]) -> list[ParamSpec]:
        """The parameters that replace a dense ``shape`` weight of ``module`` (memory estimate).

        Derived from the method's own parametrization on the meta device (its roles, frozen roles
        and the shapes ``right_inverse`` returns), so the estimate cannot drift from what training
        builds; override only for parameters a parametrization creates some other way."""
        import torch
        from torch import nn

        with torch.device("meta"):
            linear = nn.Linear(shape[1], shape[0], bias=False)
        p = self.make_parametrization(linear, module)
        originals = p.right_inverse(linear.weight)
        base = f"{module}.parametrizations.weight"
        return [
            ParamSpec(
                f"{base}.original{i}", module, role, tuple(t.shape),
                trainable=role not in p.frozen_roles, method=self.name, is_linear=True,
            )
            for i, (role, t) in enumerate(zip(p.roles, originals))
        ]

    def macs_per_token(self, module: str, shape: tuple[int, int]) -> int:
        """Multiply-accumulates per token of the parametrized layer's forward (training FLOPs are
        about 6x this). Default: one per parameter, right for layers computed from their factors;
        a method that materializes the dense W counts m * n instead."""
        return sum(s.numel for s in self.param_specs(module, shape))

    def extra_bytes(self, module: str, shape: tuple[int, int]) -> int:
        """Bytes of non-parameter state (buffers such as sparse indices) for one targeted weight."""
        return 0

    # -- OPTIMIZER ----------------------------------------------------------------------------
    def update_rule(self) -> UpdateRule:
        """The update rule for the parameters ``self.selects(spec)`` picks (``slimtrain.registry.update_rule``).

        The composition builds one optimizer per model part that routes each selected parameter to
        this rule and every other trainable parameter to the default rule (``adamw``)."""
        raise NotImplementedError(f"{self.name} declares no update rule")

    # -- memory layers: STATE_CODEC, STEPPER ---------------------------------------------------
    def state_codec(self) -> StateCodec:
        """The codec the composed optimizer stores declared state through (``StateCodec``: which
        declarations it serves, how it encodes and decodes them, the bytes it stores and holds while
        coding; the memory models read those). At most one method of a composition provides it."""
        raise NotImplementedError(f"{self.name} declares no state codec")

    def attach_stepper(self, optimizer, settings: TrainerSettings):
        """Take over WHEN ``optimizer`` (a ``ComposedOptimizer``) steps its parameters, e.g. hooks that
        call ``optimizer.step_params`` during backward; return an object with ``remove()``. The
        trainer's ``optimizer.step()`` still runs each step (it steps what has a gradient left and counts
        the step). At most one method of a composition provides it."""
        raise NotImplementedError(f"{self.name} declares no stepper")

    def master_weights(self) -> MasterWeights:
        """How the trainable parameters are stored between steps (``MasterWeights``: the storage
        dtype the trainer gives every floating-point parameter before the model is materialized,
        the optimizer state it keeps per trainable parameter, how it restores the full-precision
        master weight a rule updates and splits the result back; the memory models read its bytes).
        At most one method of a composition provides it; it composes with a state codec and a stepper."""
        raise NotImplementedError(f"{self.name} declares no master weights")

    def check_trainer(self, settings: TrainerSettings) -> None:
        """Refuse trainer settings this method cannot honour (any method may implement it; called
        before the model is built). Raise ``ConfigError`` naming the method, the key and the value."""

    # -- PARAM_GROUPS -------------------------------------------------------------------------
    def param_group_options(self, spec: ParamSpec) -> dict[str, Any] | None:
        """Options (scalars/strings only: they are checkpointed) for the group holding ``spec``."""
        return None

    # -- STEP_HOOK ----------------------------------------------------------------------------
    def after_step(self, ctx: StepContext) -> None:
        """Act after the optimizer step ``ctx.step`` (e.g. ``if ctx.step % every == 0``)."""
        raise NotImplementedError(f"{self.name} declares no step hook")

    # -- LR_SCHEDULE --------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Factor applied to the scheduled LR at ``step`` (1.0: unchanged)."""
        return 1.0


#: the hook each hook-bearing capability stands for (a method declares the capability exactly when it
#: overrides the hook)
CAPABILITY_HOOKS: dict[Capability, str] = {
    Capability.PARAMETRIZATION: "make_parametrization",
    Capability.OPTIMIZER: "update_rule",
    Capability.PARAM_GROUPS: "param_group_options",
    Capability.STEP_HOOK: "after_step",
    Capability.LR_SCHEDULE: "lr_factor",
    Capability.STATE_CODEC: "state_codec",
    Capability.STEPPER: "attach_stepper",
    Capability.MASTER_WEIGHTS: "master_weights",
}
#: hooks of the earlier optimizer contract, replaced by ``update_rule``
RETIRED_HOOKS = ("build_optimizer", "state_elements")


def writes_weights_outside_step(method: Method) -> bool:
    """Whether ``method`` writes parameters outside the optimizer step: a step hook at the
    ``HookStage.WEIGHTS`` stage (merges, refactorizations). A master-weights layer refuses it."""
    return Capability.STEP_HOOK in method.provides and method.hook_stage is HookStage.WEIGHTS


def capability_problems(cls: type[Method]) -> list[str]:
    """What is inconsistent between ``cls.provides`` and the hooks ``cls`` overrides (empty: fine).

    Checked when a method registers, so a capability declared without its hook (or a hook without
    its capability, which the composition would never call) fails at once, naming the method."""
    problems = []
    provides = set(cls.provides)
    for cap, hook in CAPABILITY_HOOKS.items():
        overridden = getattr(cls, hook, None) is not getattr(Method, hook)
        if overridden and cap not in provides:
            problems.append(f"overrides {hook}() but does not declare Capability.{cap.name}")
        if cap in provides and not overridden:
            problems.append(f"declares Capability.{cap.name} but does not implement {hook}()")
    for hook in RETIRED_HOOKS:
        if hasattr(cls, hook):
            problems.append(f"defines {hook}(), which slimtrain no longer calls: return an UpdateRule from update_rule()")
    for cap in (Capability.FACTORIZED, Capability.FROZEN_BASE):
        if cap in provides and Capability.PARAMETRIZATION not in provides:
            problems.append(f"declares Capability.{cap.name} without Capability.PARAMETRIZATION")
    feeds_estimate = bool(provides & {Capability.PARAMETRIZATION, Capability.OPTIMIZER})
    if feeds_estimate != (Capability.MEMORY_ESTIMATE in provides):
        problems.append(
            "Capability.MEMORY_ESTIMATE must be declared exactly by methods with PARAMETRIZATION or OPTIMIZER "
            f"(their parameters and rule state enter the estimate); it is {'missing' if feeds_estimate else 'declared'}"
        )
    return problems
