"""Composition: turn an ordered list of method names plus config sections into one validated plan.

Every check that needs no model runs in ``compose`` (unknown methods, unknown keys, bad values,
conflicts, missing requirements), so a bad recipe fails before any model is built. What needs the
model (patterns that match nothing, a weight already parametrized) is checked when applied.

The order things apply in is fixed here, never pluggy's registration order:

1. Parametrizations, in the order the methods are listed (each Linear weight takes at most one).
2. Factor initialization, after the model's own ``init_weights``, in the same order.
3. Param-group options, merged from every PARAM_GROUPS method (a key set twice must agree).
4. ONE optimizer per model part (``slimtrain.registry.composed_optimizer.ComposedOptimizer``): each trainable
   parameter goes to the update rule of the OPTIMIZER method that selects it (selections must be
   disjoint), every other one to the default rule (``adamw``, always part of the composition).
5. Step hooks after each optimizer step: ``HookStage.WEIGHTS`` (refactorization, merges) before
   ``HookStage.OPTIMIZER_STATE`` (momentum reset); within a stage, in list order.
6. LR factors multiply the trainer's schedule (order-free).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from slimtrain.registry.config import parse_config
from slimtrain.registry.errors import CompositionError, ConfigError
from slimtrain.registry.method import Capability, Method, OptimizerHyper, ParamSpec, StepContext, TrainerSettings
from slimtrain.registry.targets import probe_overlap

DEFAULT_OPTIMIZER = "adamw"
#: param-group keys the composition sets itself (the rule's name, the true step)
RESERVED_GROUP_KEYS = ("params", "rule", "global_step")


@dataclasses.dataclass
class RoutingPlan:
    """Which update rule steps each trainable parameter: the one routing every consumer reads (the
    param groups and the optimizer, both memory models, the checks before the model). Built once per
    composition and set of parameters (``Composition.routing``); its rules are the composition's own
    (``Composition.rules``: one per optimizer method, built once, ``implementation`` set)."""

    rules: dict[str, Any]  # optimizer method name -> its UpdateRule
    owners: dict[str, str]  # parameter name -> the optimizer method that steps it
    specs: list[ParamSpec]  # the trainable parameters, in model order

    def rule_of(self, spec: ParamSpec):
        return self.rules[self.owners[spec.name]]

    def by_rule(self) -> list[tuple[Any, list[ParamSpec]]]:
        """(rule, its parameters) per optimizer method that owns any, in first-seen order."""
        out: dict[str, tuple[Any, list[ParamSpec]]] = {}
        for spec in self.specs:
            name = self.owners[spec.name]
            out.setdefault(name, (self.rules[name], []))[1].append(spec)
        return list(out.values())


@dataclasses.dataclass
class Composition:
    """A validated, ordered set of configured methods. Build it with ``compose``."""

    methods: list[Method]
    default: Method | None = None  # the default optimizer method when ``methods`` lists none by name
    model: Any = None  # the ModelDescription of the model it trains (``describe_model``); None until set
    _specs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _rules: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _plans: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    _implementation: str = dataclasses.field(default="foreach", repr=False, compare=False)

    # -- introspection --------------------------------------------------------------------------
    @property
    def method_names(self) -> list[str]:
        return [m.name for m in self.methods]

    def with_capability(self, cap: Capability) -> list[Method]:
        return [m for m in self.methods if cap in m.provides]

    @property
    def has_parametrization(self) -> bool:
        return bool(self.with_capability(Capability.PARAMETRIZATION))

    @property
    def default_optimizer(self) -> Method:
        """The method whose rule takes every parameter no other optimizer method selects."""
        for m in self.methods:
            if m.name == DEFAULT_OPTIMIZER:
                return m
        if self.default is None:
            from slimtrain.registry.manager import get_methods

            self.default = get_methods()[DEFAULT_OPTIMIZER].cls()
        return self.default

    @property
    def optimizer_methods(self) -> list[Method]:
        """The OPTIMIZER methods with a selection of their own (all but the default)."""
        return [m for m in self.with_capability(Capability.OPTIMIZER) if m.name != DEFAULT_OPTIMIZER]

    @property
    def optimizer_method(self) -> Method:
        """The first non-default optimizer method, else the default (for messages)."""
        return (self.optimizer_methods or [self.default_optimizer])[0]

    def owner_of(self, spec: ParamSpec) -> Method:
        """The optimizer method whose rule updates ``spec``: the one that selects it, else the
        default; two that select it are an error naming both and the parameter."""
        owners = [m for m in self.optimizer_methods if m.selects(spec)]
        if len(owners) > 1:
            raise CompositionError(
                f"two optimizer methods on the same parameters: {owners[0].name!r} and {owners[1].name!r} "
                f"both select {spec.name} (role {spec.role!r}); make their `targets` or `roles` disjoint"
            )
        return owners[0] if owners else self.default_optimizer

    # -- memory layers --------------------------------------------------------------------------
    @property
    def codec_method(self) -> Method | None:
        """The STATE_CODEC method (at most one: ``compose`` checks), if any."""
        return next(iter(self.with_capability(Capability.STATE_CODEC)), None)

    @property
    def stepper_method(self) -> Method | None:
        """The STEPPER method (at most one: ``compose`` checks), if any."""
        return next(iter(self.with_capability(Capability.STEPPER)), None)

    @property
    def steps_in_backward(self) -> bool:
        """Whether parameters are stepped inside backward, one at a time (memory models)."""
        return self.stepper_method is not None and self.stepper_method.steps_in_backward

    def state_codec(self):
        """The codec every composed optimizer stores its state through (``None``: as declared)."""
        return self.codec_method.state_codec() if self.codec_method is not None else None

    @property
    def master_method(self) -> Method | None:
        """The MASTER_WEIGHTS method (at most one: ``compose`` checks), if any."""
        return next(iter(self.with_capability(Capability.MASTER_WEIGHTS)), None)

    def master_weights(self):
        """How the parameters are stored between steps (a ``MasterWeights``; ``None``: as they are)."""
        return self.master_method.master_weights() if self.master_method is not None else None

    def store_parameters(self, model) -> int:
        """Give the model's floating-point parameters the master-weights layer's storage dtype (where
        the trainer sets the parameters' storage: the meta model before sharding, or after the init;
        refuses non-floating-point parameters, naming the method). Without such a layer: nothing."""
        from slimtrain.registry.master_weights import store_parameters

        master = self.master_weights()
        return 0 if master is None else store_parameters(model, master, self.master_method.name)

    def check_trainer(self, settings: TrainerSettings) -> None:
        """Every method's ``check_trainer`` (trainer settings it cannot honour), before the model."""
        for m in self.methods:
            m.check_trainer(settings)

    def install_memory_layers(self, optimizer, settings: TrainerSettings | None = None):
        """Put the memory layers on one composed optimizer: the codec its state is stored through,
        then the stepper that decides when it steps (returned; ``None`` without one). Every trainer
        (torchtitan's builder, ``slimtrain.prepare``, the HF adapter) installs them through this."""
        master = self.master_weights()
        if master is not None:
            optimizer.install_master(master)
        codec = self.state_codec()
        if codec is not None:
            optimizer.install_codec(codec)
        stepper = self.stepper_method
        return stepper.attach_stepper(optimizer, settings or TrainerSettings()) if stepper is not None else None

    # -- routing: the rule of every parameter ---------------------------------------------------
    @property
    def implementation(self) -> str:
        """The trainer's ``optimizer.implementation``, handed to every rule (``foreach`` default)."""
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        self._implementation = value
        for rule in self._rules.values():
            rule.implementation = value

    @property
    def rules(self) -> dict[str, Any]:
        """One update rule per optimizer method (the default's included), built once, with its
        owner's name and the trainer's implementation set."""
        if not self._rules:
            for m in [self.default_optimizer, *self.optimizer_methods]:
                rule = _rule_of(m)
                rule.implementation = self._implementation
                self._rules[m.name] = rule
        return self._rules

    def routing(self, specs) -> RoutingPlan:
        """The routing plan of the trainable ``specs`` (built once per set of parameters)."""
        trainable = tuple(s for s in specs if s.trainable)
        plan = self._plans.get(trainable)
        if plan is None:
            owners = {s.name: self.owner_of(s).name for s in trainable}
            plan = self._plans[trainable] = RoutingPlan(self.rules, owners, list(trainable))
        return plan

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def describe(self) -> str:
        lines = ["slimtrain composition (applied in this order):"]
        for m in self.methods:
            caps = ", ".join(sorted(c.value for c in m.provides))
            lines.append(f"  {m.name} [{caps}] {m.config}")
        return "\n".join(lines)

    # -- model-time application ---------------------------------------------------------------
    def describe_model(self, description) -> None:
        """Hand ``description`` (a ``ModelDescription``) to the composition and every method in it
        (``method.model``), before anything is applied, so methods can read the model's sizes."""
        self.model = description
        for m in [*self.methods, self.default_optimizer]:
            m.model = description

    def apply_parametrizations(self, model) -> list[str]:
        """Parametrize the targeted Linear weights of ``model`` (meta device, before sharding)."""
        from slimtrain.registry.parametrization import attach, parametrization_of
        from slimtrain.registry.targets import select_linears

        done: dict[str, str] = {}
        for m in self.with_capability(Capability.PARAMETRIZATION):
            for fqn, linear in select_linears(model, m.target_patterns(), owner=m.name):
                if fqn in done or parametrization_of(linear) is not None:
                    raise CompositionError(
                        f"two parametrizations of the same weight: {fqn}.weight is targeted by "
                        f"{done.get(fqn, '?')!r} and {m.name!r}; narrow their `targets`"
                    )
                attach(linear, m.make_parametrization(linear, fqn))
                done[fqn] = m.name
        return list(done)

    def capture_init(self):
        """Context manager around the model's own ``init_weights`` (see parametrization.capture_init)."""
        from slimtrain.registry.parametrization import capture_init

        return capture_init()

    def init_parametrized(self, model) -> None:
        """Initialize every parametrization's originals in place, after the model's own init."""
        import torch

        from slimtrain.registry.parametrization import iter_parametrized, originals

        with torch.no_grad():
            for fqn, linear, p in iter_parametrized(model):
                p.initialize(originals(linear), fqn)

    def param_specs(self, model) -> list[tuple[ParamSpec, Any]]:
        """(spec, parameter) for every parameter of ``model``, with roles and owning methods."""
        return model_param_specs(model)


    def param_groups(self, model) -> list[dict[str, Any]]:
        """Trainable parameters grouped by update rule (group key ``"rule"``) and by the options
        the PARAM_GROUPS methods give them. Records each parameter's spec for ``build_optimizer``
        and checks each rule accepts its parameters (errors name the method and parameter)."""
        groups: dict[tuple, dict[str, Any]] = {}
        contributors = self.with_capability(Capability.PARAM_GROUPS)
        specs = self.param_specs(model)
        selected = {m.name: 0 for m in contributors}
        owned = {m.name: 0 for m in self.optimizer_methods}
        plan = self.routing(spec for spec, param in specs if param.requires_grad)
        for spec, param in specs:
            if not param.requires_grad:
                continue
            owner = plan.owners[spec.name]
            if owner in owned:
                owned[owner] += 1
                plan.rule_of(spec).check(spec)
            self._specs[param] = spec
            options: dict[str, Any] = {"rule": owner}
            for m in contributors:
                contributed = m.param_group_options(spec) or {}
                selected[m.name] += bool(contributed)
                for key, value in contributed.items():
                    if key in RESERVED_GROUP_KEYS:
                        raise CompositionError(
                            f"[{m.name}] param_group_options sets {key!r}, which the composition owns; "
                            f"reserved keys: {', '.join(RESERVED_GROUP_KEYS)}"
                        )
                    if key in options and options[key] != value:
                        raise CompositionError(
                            f"{spec.name}: param-group option {key!r} set to {options[key]!r} and "
                            f"{value!r} by different methods"
                        )
                    options[key] = value
            key = tuple(sorted(options.items()))
            group = groups.setdefault(key, {"params": [], **options})
            group["params"].append(param)
        for m in contributors:
            if not selected[m.name]:
                raise ConfigError(_selects_nothing(m, specs))
        for m in self.optimizer_methods:
            if not owned[m.name]:
                raise ConfigError(_selects_nothing(m, specs))
        return list(groups.values())

    def build_optimizer(self, param_groups: list[dict[str, Any]], hyper: OptimizerHyper, *, codec=None):
        """One ``ComposedOptimizer`` over ``param_groups`` (from ``param_groups(model)``), each
        group stepped by its rule; the trainer's hyperparameters apply to every rule alike."""
        from slimtrain.registry.composed_optimizer import ComposedOptimizer

        self.implementation = hyper.implementation
        for group in param_groups:
            group["rule"] = group.get("rule", DEFAULT_OPTIMIZER)
        return ComposedOptimizer(
            param_groups, rules=self.rules, specs=self._specs, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps,
            weight_decay=hyper.weight_decay, codec=codec,
        )

    def rule_for(self, spec: ParamSpec):
        """The update rule that would update ``spec`` (memory estimate; no model needed)."""
        return self.rules[self.owner_of(spec).name]

    def step_hooks(self) -> list[Method]:
        hooks = self.with_capability(Capability.STEP_HOOK)
        return sorted(hooks, key=lambda m: (int(m.hook_stage), self.methods.index(m)))

    def after_step(self, ctx: StepContext) -> None:
        for m in self.step_hooks():
            m.after_step(ctx)

    def lr_factor(self, step: int) -> float:
        factor = 1.0
        for m in self.with_capability(Capability.LR_SCHEDULE):
            factor *= m.lr_factor(step)
        return factor

    def estimate_memory(self, weights, **kwargs):
        """Analytic memory of weights and optimizer state; see ``slimtrain.registry.memory``."""
        from slimtrain.registry.memory import estimate_memory

        return estimate_memory(self, weights, **kwargs)


def model_param_specs(model) -> list[tuple[ParamSpec, Any]]:
    """(spec, parameter) for every parameter of ``model``, with roles and owning methods (needs no
    composition: the parametrizations on the model say which method made each original)."""
    from slimtrain.registry.parametrization import canonical_name, parametrization_of, role_of

    marker = ".parametrizations.weight.original"
    out = []
    for name, param in model.named_parameters():
        if marker in name:
            module_name, local = name.split(".parametrizations.", 1)
            local = "parametrizations." + local
        else:
            module_name, _, local = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        p = parametrization_of(module)
        method = p.method if (p is not None and marker in name) else None
        spec = _spec(canonical_name(module_name), local, param, module, method, role_of(local, module))
        out.append((spec, param))
    return out


def _rule_of(method: Method):
    """``method.update_rule()`` with its owner's name filled in."""
    rule = method.update_rule()
    if not getattr(rule, "method", ""):
        rule.method = method.name
    return rule


def _selects_nothing(method: Method, specs: list[tuple[ParamSpec, Any]]) -> str:
    """The message for a method whose selection matched no trainable parameter of the model."""
    from slimtrain.registry.targets import matches_any

    patterns = method.target_patterns()
    matched = sorted({s.role + ("" if s.trainable else " (frozen)") for s, _ in specs if s.is_linear and matches_any(s.module, patterns)})
    linears = sorted({s.module.rsplit(".", 1)[-1] for s, _ in specs if s.is_linear})
    return (
        f"[{method.name}] selects no trainable parameter of the model: targets = {list(patterns)!r}, "
        f"roles = {list(method.target_roles())!r}; "
        + (f"the targeted layers have roles: {', '.join(matched)}" if matched else f"candidate layer names: {', '.join(linears)}")
    )


def _spec(module_name: str, local: str, param, module, method, role: str | None = None) -> ParamSpec:
    from torch import nn

    name = f"{module_name}.{local}" if module_name else local
    return ParamSpec(
        name=name,
        module=module_name,
        role=role or local.rsplit(".", 1)[-1],
        shape=tuple(param.shape),
        trainable=param.requires_grad,
        method=method,
        is_linear=isinstance(module, nn.Linear),
    )


def compose(
    method_names: Sequence[str],
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    available: Mapping[str, Any] | None = None,
) -> Composition:
    """Validate and build a composition. ``sections`` maps method name -> raw config values.

    ``available`` (name -> MethodInfo or Method class) defaults to every installed method.
    """
    if available is None:
        from slimtrain.registry.manager import get_methods

        available = get_methods()
    classes = {name: getattr(info, "cls", info) for name, info in available.items()}
    sections = dict(sections or {})
    names = [str(n).strip() for n in method_names if str(n).strip()]

    seen: set[str] = set()
    for name in names:
        if name not in classes:
            raise CompositionError(
                f"unknown method {name!r}; installed methods: {', '.join(sorted(classes)) or '(none)'}"
            )
        if name in seen:
            raise CompositionError(f"method {name!r} is listed twice in methods")
        seen.add(name)
    stray = sorted(set(sections) - set(names) - set(classes))
    if stray:
        raise ConfigError(f"config section(s) {', '.join(stray)} name no installed method")

    if DEFAULT_OPTIMIZER not in classes:
        raise CompositionError(f"the default optimizer method {DEFAULT_OPTIMIZER!r} is not installed")
    if not any(Capability.OPTIMIZER in classes[n].provides for n in names):
        names.append(DEFAULT_OPTIMIZER)

    methods = [classes[n](parse_config(classes[n].Config, sections.get(n), n)) for n in names]
    _check_conflicts(methods)
    _check_requirements(methods, classes)
    _check_memory_layers(methods)
    default = None
    if DEFAULT_OPTIMIZER not in names:
        cls = classes[DEFAULT_OPTIMIZER]
        default = cls(parse_config(cls.Config, sections.get(DEFAULT_OPTIMIZER), DEFAULT_OPTIMIZER))
    return Composition(methods, default)


def _check_conflicts(methods: list[Method]) -> None:
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            if b.name in a.conflicts_with or a.name in b.conflicts_with:
                raise CompositionError(f"{a.name!r} conflicts with {b.name!r}: use one of them")
            for cap, what in (
                (Capability.PARAMETRIZATION, "two parametrizations of the same weight"),
                (Capability.OPTIMIZER, "two optimizer methods on the same parameters"),
            ):
                if cap is Capability.OPTIMIZER and DEFAULT_OPTIMIZER in (a.name, b.name):
                    continue  # the default rule takes only what the others leave
                if cap in a.provides and cap in b.provides:
                    shared = probe_overlap(a.target_patterns(), b.target_patterns())
                    if cap is Capability.OPTIMIZER and not _roles_overlap(a.target_roles(), b.target_roles()):
                        shared = []
                    if shared:
                        raise CompositionError(
                            f"{what}: {a.name!r} and {b.name!r} both target "
                            f"{', '.join(dict.fromkeys(s.rsplit('.', 1)[-1] for s in shared))}; "
                            f"keep one or make their `targets` (or `roles`) disjoint"
                        )


def _check_memory_layers(methods: list[Method]) -> None:
    """At most one state codec and one stepper (who decides when the step happens); both serve only
    rules that declare their state (a codec stores declarations, a stepper steps one parameter at a
    time through them)."""
    from slimtrain.registry.update_rule import UpdateRule

    for cap, what in (
        (Capability.STATE_CODEC, "both store the optimizer state (one state codec per composition)"),
        (Capability.STEPPER, "both want to own when the optimizer step happens (one stepper per composition)"),
        (Capability.MASTER_WEIGHTS, "both store the parameters (one master-weights layer per composition)"),
    ):
        layers = [m.name for m in methods if cap in m.provides]
        if len(layers) > 1:
            raise CompositionError(f"{layers[0]!r} and {layers[1]!r} {what}; keep one of them in methods")
    from slimtrain.registry.method import writes_weights_outside_step

    for master in (m for m in methods if Capability.MASTER_WEIGHTS in m.provides):
        for m in methods:
            if m is not master and writes_weights_outside_step(m):
                raise ConfigError(
                    f"[{master.name}] methods = {[x.name for x in methods]!r} includes {m.name!r}, whose step hook "
                    f"writes the parameters outside the optimizer step; {master.name} keeps state that must match "
                    f"each stored parameter (it restores the master weight from both); drop one of them from methods"
                )
    layers = [m for m in methods if m.provides & {Capability.STATE_CODEC, Capability.STEPPER}]
    for layer in layers:
        for m in methods:
            if Capability.OPTIMIZER in m.provides and type(m.update_rule()).state_specs is UpdateRule.state_specs:
                role = "stores declared state" if Capability.STATE_CODEC in layer.provides else "steps rules one parameter at a time through their declared state"
                raise ConfigError(
                    f"[{layer.name}] optimizer method {m.name!r} declares no state (its update rule has no "
                    f"state_specs): {layer.name} {role}; drop one of them from methods"
                )


def _roles_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two role selections (fnmatch patterns such as ``*`` or ``A``) share a role."""
    import fnmatch

    return any(fnmatch.fnmatchcase(x, y) or fnmatch.fnmatchcase(y, x) for x in a for y in b)


def _check_requirements(methods: list[Method], classes: Mapping[str, type[Method]]) -> None:
    for m in methods:
        for req in m.requires:
            if not any(req.capability in other.provides for other in methods if other is not m):
                providers = sorted(n for n, c in classes.items() if req.capability in c.provides)
                raise CompositionError(
                    f"{m.name!r} requires {req.why}; add one of: {', '.join(providers) or '(none installed)'} "
                    f"to methods"
                )
