"""``ComposedOptimizer``: ONE torch optimizer per model part that runs every method's update rule.

Why one optimizer: torchtitan (and most trainers) step, checkpoint and schedule optimizers as a unit;
several optimizer methods on disjoint parameters must therefore live in one optimizer, and every
rule must see the same hyperparameters and the same true step.

* Param groups: one per rule (group key ``"rule"``: the method name) and per distinct option set
  other methods contribute (``lr``, ``weight_decay``, ...). Names and specs live in a side table
  keyed by the parameter, never in the groups (groups are checkpointed; they hold scalars only).
* State is created from each rule's declarations (``slimtrain.registry.update_rule.StateSpec``) when the
  optimizer is built: dtype, initial value and, under FSDP2, the DTensor layout. Creating it up front
  also stops ``torch.distributed.checkpoint`` from initializing state by stepping on zero gradients.
  After a rule's first step the optimizer checks the rule kept exactly what it declared.
* The true step: ``global_step`` (completed optimizer steps) is kept in every param group, so it is
  checkpointed with the groups and restored on resume; it feeds ``StepInfo.step`` and the trainer's
  step hooks. Nothing else counts steps.
* ``load_state_dict`` keeps each state tensor's DECLARED dtype (torch's default casts floating state
  to the parameter dtype, which turned bf16 runs' fp32 projections into bf16: resume not bitwise).
* ``reset_state(params)`` applies each declaration's ``OnReset`` (momentum reset knows no key names).
* ``step_params(params)`` steps just those parameters as part of step ``global_step + 1``;
  ``finish_step()`` then counts the step (per-layer updates); ``step()`` is both.
* A ``StateCodec`` may store the declarations it ``serves`` encoded (8-bit state); the rule always
  sees the declared dtype. Without one (the default) the rule works on the stored tensors directly.
  With one, a parameter whose state it serves is decoded, stepped and re-encoded on its own (a list
  of one for the rule), so at most one parameter's state exists decoded at a time; parameters with
  no served state are still stepped together (foreach batching). A codec with ``fused_step`` (8-bit
  state) may instead step a parameter itself when its rule declares ``elementwise_update``: decode,
  update and encode in one compiled kernel, the state never decoded in full.
* A ``MasterWeights`` layer (``install_master``: compressed master weights) stores the parameters in
  a low-precision dtype plus state of its own; every parameter is then stepped on its own: the
  layer restores its master-precision weight, the rule updates that copy with the gradient cast to
  the master dtype (state declared without a dtype is kept in the master dtype), the layer splits
  the result back into the stored parameter and its state.
* ``accumulate_params(params, micro)`` (per-layer updates with gradient accumulation): a parameter
  whose rule declares ``accumulation_specs`` has micro-batch ``micro``'s gradient folded into its
  buffers (``UpdateRule.accumulate``); the stepper then frees the gradient, and the step that follows
  hands the buffers to the rule (``RuleParam.accumulated``) and drops them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from slimtrain.registry.errors import CompositionError
from slimtrain.registry.method import ParamSpec
from slimtrain.registry.update_rule import OnReset, RuleParam, StateSpec, StepInfo, UpdateRule

__all__ = ["ComposedOptimizer", "StateCodec"]

STEP_KEY = "global_step"


class StateCodec:
    """How declared state is stored (identity here; a STATE_CODEC method returns a subclass from
    ``Method.state_codec``, e.g. ``state_8bit``'s 8-bit codes).

    ``serves`` says which declarations it stores (from the declaration alone: ``moment``,
    ``non_negative``, the shape; never the key name); the rest stay as declared. ``encode`` turns the
    declared-dtype value into the tensors stored in ``optimizer.state[param]`` (keys of its choice,
    all tensors, so checkpoints save them); ``decode`` rebuilds the value; ``stored_keys`` names the
    keys ``encode`` writes. The memory models read ``stored_bytes`` (what stays between steps) and
    ``coding_bytes`` (what encoding or decoding one tensor holds at once, besides the decoded copy)."""

    def serves(self, decl: StateSpec) -> bool:
        return False

    def stored_keys(self, decl: StateSpec) -> tuple[str, ...]:
        return (decl.name,)

    def encode(self, decl: StateSpec, value: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        state[decl.name] = value

    def decode(self, decl: StateSpec, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return state[decl.name]

    def stored_bytes(self, decl: StateSpec, bytes_per_element: int) -> int:
        """Bytes kept for a served declaration between steps (default: the declared elements)."""
        return decl.numel * bytes_per_element

    def coding_bytes(self, decl: StateSpec, bytes_per_element: int) -> int:
        """Transient bytes of encoding or decoding one served declaration (not its decoded copy)."""
        return 0


def _local(t: torch.Tensor) -> torch.Tensor:
    from slimtrain.registry.tensors import local_tensor

    return local_tensor(t)


def make_state_tensor(param: torch.Tensor, decl: StateSpec, default_dtype: torch.dtype | None = None, *,
                      row_view: bool = False) -> torch.Tensor:
    """A fresh state tensor for ``param`` from its declaration (plain, or a DTensor under FSDP2:
    ``rows`` sharded like the parameter's rows, ``replicate`` identical on every rank);
    ``default_dtype`` (else the parameter's) for a declaration without a dtype. ``row_view``:
    ``rows`` state in the layout a row-based rule sees the parameter in (tensor parallelism:
    ``slimtrain.registry.sharded.row_placements``)."""
    from slimtrain.registry.tensors import is_dtensor

    dtype = decl.dtype or default_dtype or param.dtype
    local_param = _local(param)
    if decl.shape == ():
        device = torch.device("cpu") if decl.host else local_param.device
        return torch.full((), decl.init_value, dtype=dtype, device=device)
    if not is_dtensor(param):
        return torch.full(decl.shape, decl.init_value, dtype=dtype, device=param.device)
    from torch.distributed.tensor import DTensor, Replicate

    mesh = param.device_mesh
    if decl.layout == "rows":
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        placements = param.placements
        if row_view:
            from slimtrain.registry.sharded import row_placements

            placements = row_placements(placements)
        local_shape, _ = compute_local_shape_and_global_offset(decl.shape, mesh, placements)
        local = torch.full(local_shape, decl.init_value, dtype=dtype, device=local_param.device)
        stride = tuple(int(torch.empty(decl.shape, device="meta").stride(i)) for i in range(len(decl.shape)))
        return DTensor.from_local(local, mesh, placements, shape=decl.shape, stride=stride)
    local = torch.full(decl.shape, decl.init_value, dtype=dtype, device=local_param.device)
    return DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim, run_check=False)


class ComposedOptimizer(torch.optim.Optimizer):
    """Routes each param group to its rule (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        rules: Mapping[str, UpdateRule],
        specs: Mapping[torch.Tensor, ParamSpec],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        codec: StateCodec | None = None,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **{STEP_KEY: 0})
        super().__init__(params, defaults)
        self.rules = dict(rules)
        self.codec = codec
        self.master = None  # a MasterWeights layer (install_master)
        self.specs: dict[torch.Tensor, ParamSpec] = {}
        self.declared: dict[torch.Tensor, list[StateSpec]] = {}
        self._rule_of: dict[torch.Tensor, str] = {}
        self._checked: set[tuple[str, bool]] = set()
        self.accumulation: dict[torch.Tensor, list[StateSpec] | None] = {}  # per parameter, its rule's
        self._buffers: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # filled within a step
        self._micro: dict[torch.Tensor, int] = {}  # micro-batches folded into those buffers
        for group in self.param_groups:
            name = group.get("rule")
            if name not in self.rules:
                raise CompositionError(
                    f"param group with rule = {name!r}: no such rule; rules: {', '.join(sorted(self.rules))}"
                )
            rule = self.rules[name]
            for p in group["params"]:
                spec = specs.get(p)
                if spec is None:
                    raise CompositionError(f"[{name}] a parameter of shape {tuple(p.shape)} has no spec (name)")
                rule.check(spec)
                self.specs[p] = spec
                self._rule_of[p] = name
                self.declared[p] = list(rule.state_specs(spec))
                self.accumulation[p] = rule.accumulation_specs(spec)
                self._create_state(p)

    # -- state ----------------------------------------------------------------------------------
    def coded(self, decl: StateSpec) -> bool:
        """Whether ``decl`` is stored through the installed codec."""
        return self.codec is not None and self.codec.serves(decl)

    def _has_coded_state(self, p: torch.Tensor) -> bool:
        return self.codec is not None and any(self.codec.serves(d) for d in self.declared[p])

    def declared_dtype(self, p: torch.Tensor, decl: StateSpec) -> torch.dtype:
        """The dtype the rule sees ``decl`` in: its own, else the master weights' (with a
        master-weights layer), else the parameter's."""
        return decl.dtype or (self.master.master_dtype if self.master is not None else p.dtype)

    def _create_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        for decl in self.declared[p]:
            value = make_state_tensor(p, decl, self.declared_dtype(p, decl), row_view=self._row_based(p))
            if self.coded(decl):
                self.codec.encode(decl, value, state)
            else:
                state[decl.name] = value

    def _row_based(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s rule sees it through its row view (a rule not elementwise on any shard,
        ``p`` sharded by tensor parallelism: slimtrain.registry.sharded)."""
        from slimtrain.registry.sharded import needs_row_view

        rule = self.rules[self._rule_of[p]]
        return not getattr(rule, "any_placement", False) and needs_row_view(p)

    def _item(self, p: torch.Tensor, pi: int, gi: int, state: dict[str, torch.Tensor],
              accumulated: dict[str, torch.Tensor] | None = None, micro: int = 1) -> RuleParam:
        spec = self.specs[p]
        if self._row_based(p):  # tensor parallelism (per-layer accumulation is refused under it)
            from slimtrain.registry.sharded import row_view

            return RuleParam(spec.name, spec, row_view(p.detach()), row_view(p.grad), state, pi, gi, accumulated, micro)
        return RuleParam(spec.name, spec, p, p.grad, state, pi, gi, accumulated, micro)

    def _view(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state a rule sees: stored tensors, moments decoded when a codec is installed."""
        state = self.state[p]
        if self.codec is None and self.master is None:
            return state
        view = {}
        for decl in self.declared[p]:
            if self.coded(decl):
                view[decl.name] = self.codec.decode(decl, state, self.declared_dtype(p, decl))
            else:
                view[decl.name] = state[decl.name]
        return view

    def _store(self, p: torch.Tensor, view: dict[str, torch.Tensor]) -> None:
        if self.codec is None and self.master is None:
            return
        state = self.state[p]
        for decl in self.declared[p]:
            if self.coded(decl):
                self.codec.encode(decl, view[decl.name], state)
            else:
                state[decl.name] = view[decl.name]

    def _check_declared(self, rule_name: str, items: list[RuleParam], params: list[torch.Tensor] | None = None) -> None:
        """After a rule's first step: it kept exactly the state it declared, in shape and dtype
        (``params``: the stored parameters, where the items carry master copies or row views)."""
        for i, item in enumerate(items):
            p = item.param if params is None else params[i]
            decls = {d.name: d for d in self.declared[p]}
            extra = sorted(set(item.state) - set(decls))
            if extra:
                raise CompositionError(
                    f"[{rule_name}] the update rule created undeclared state {extra[0]!r} for {item.name}; "
                    f"declared: {', '.join(sorted(decls)) or '(none)'} (add it to state_specs)"
                )
            for name, decl in decls.items():
                value = item.state.get(name)
                if not isinstance(value, torch.Tensor):
                    raise CompositionError(
                        f"[{rule_name}] declares state {name!r} for {item.name} but left "
                        f"{type(value).__name__} there (state must stay the declared tensor)"
                    )
                dtype = self.declared_dtype(p, decl)
                if tuple(value.shape) != decl.shape or value.dtype != dtype:
                    raise CompositionError(
                        f"[{rule_name}] state {name!r} of {item.name}: declared shape {decl.shape} dtype "
                        f"{dtype}, the rule left shape {tuple(value.shape)} dtype {value.dtype}"
                    )

    def install_codec(self, codec: StateCodec) -> int:
        """Store the declarations ``codec`` serves through it from now on: re-encode the state held
        and set the codec (a STATE_CODEC method's, installed by the trainer after building the
        optimizer). Returns how many tensors are now encoded."""
        if self.codec is not None:
            raise CompositionError(
                f"the optimizer already stores its state through {type(self.codec).__name__}; "
                f"a composition has at most one state codec"
            )
        n = 0
        for p, decls in self.declared.items():
            state = self.state[p]
            for decl in decls:
                if codec.serves(decl):
                    codec.encode(decl, state.pop(decl.name), state)
                    n += 1
        self.codec = codec
        return n

    def install_master(self, master) -> int:
        """Store the parameters through ``master`` (a ``MasterWeights``) from now on: check each is in
        its ``storage_dtype`` (the trainer stored them so before sharding; ``store_parameters``),
        keep state declared without a dtype in its ``master_dtype`` and create its state per
        parameter. Installed before a state codec. Returns how many parameters it serves."""
        if self.master is not None:
            raise CompositionError("the optimizer already has master weights; a composition has at most one such layer")
        if self.codec is not None:
            raise CompositionError("install the master weights before the state codec (Composition.install_memory_layers)")
        for p, decls in self.declared.items():
            if p.dtype != master.storage_dtype:
                raise CompositionError(
                    f"{self.specs[p].name} is stored as {p.dtype}, the master-weights layer expects "
                    f"{master.storage_dtype}: store the model's parameters with store_parameters before "
                    f"building the optimizer"
                )
            state = self.state[p]
            clash = sorted(set(master.stored_keys()) & {d.name for d in decls})
            if clash:
                raise CompositionError(
                    f"the master-weights layer's state {clash[0]!r} of {self.specs[p].name} is also declared by its rule"
                )
            for decl in decls:
                if decl.dtype is None:
                    state[decl.name] = state[decl.name].to(master.master_dtype)
            master.init_state(p, state)
        self.master = master
        return len(self.declared)

    # -- the true step --------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        """Completed optimizer steps (restored with the param groups on resume)."""
        return max((int(g.get(STEP_KEY, 0)) for g in self.param_groups), default=0)

    def finish_step(self) -> None:
        """Count one optimizer step (``step()`` does it; per-layer updates call it once per step)."""
        done = self.global_step + 1
        for g in self.param_groups:
            g[STEP_KEY] = done

    # -- per-layer accumulation -----------------------------------------------------------------
    def accumulates(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s rule accumulates into its own buffers (``accumulation_specs``)."""
        return self.accumulation.get(p) is not None

    def pending(self) -> list[torch.Tensor]:
        """Parameters with buffers filled this step and not stepped yet."""
        return list(self._buffers)

    @torch.no_grad()
    def accumulate_params(self, params: Iterable[torch.Tensor]) -> None:
        """Fold each of ``params``' current gradient into its rule's buffers (rules that declare
        ``accumulation_specs``; others are left to accumulate in ``p.grad``)."""
        wanted = set(params)
        info = None
        for gi, group in enumerate(self.param_groups):
            rule = self.rules[group["rule"]]
            for pi, p in enumerate(group["params"]):
                if p not in wanted or p.grad is None or not self.accumulates(p):
                    continue
                if info is None:
                    info = StepInfo(step=self.global_step + 1, lr=group["lr"], betas=tuple(group["betas"]),
                                    eps=group["eps"], weight_decay=group["weight_decay"])
                state = {d.name: self.state[p][d.name] for d in self.declared[p] if not self.coded(d)}
                item = RuleParam(self.specs[p].name, self.specs[p], p, p.grad, state, pi, gi)
                micro = self._micro.get(p, 0)
                rule.accumulate(item, self._buffers.setdefault(p, {}), micro, info)
                self._micro[p] = micro + 1

    # -- stepping -------------------------------------------------------------------------------
    def _step_group(self, gi: int, group: dict, params: Iterable[torch.Tensor]) -> None:
        name = group["rule"]
        rule = self.rules[name]
        together, alone = [], []
        for pi, p in enumerate(group["params"]):
            if p.grad is None or (params is not None and p not in params):
                continue
            (alone if self._has_coded_state(p) else together).append((pi, p))
        if not together and not alone:
            return
        info = StepInfo(
            step=self.global_step + 1, lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        if self.master is not None:
            for pi, p in together + alone:
                self._step_master(name, rule, gi, pi, p, info)
            return
        # coded state: one parameter decoded at a time, re-encoded before the next is decoded; or,
        # where the codec fuses and the rule declares an elementwise update, never decoded at all
        fuse = getattr(self.codec, "fused_step", None)
        if fuse is not None and alone:
            unfused = []
            for pi, p in alone:
                update = None if p in self._buffers else rule.elementwise_update(self.specs[p])
                item = RuleParam(self.specs[p].name, self.specs[p], p, p.grad, self.state[p], pi, gi)
                if update is None or self._row_based(p) or not fuse(update, self.declared[p], item, info):
                    unfused.append((pi, p))
            alone = unfused
        for batch in ([together] if together else []) + [[x] for x in alone]:
            items = [self._item(p, pi, gi, self._view(p), self._buffers.pop(p, None), self._micro.pop(p, 1))
                     for pi, p in batch]
            rule.step(items, info)
            for item, (_, p) in zip(items, batch):
                if item.param is not p:
                    from slimtrain.registry.sharded import write_back

                    write_back(item.param, p)
                self._store(p, item.state)
            key = (name, batch is not together)
            if key not in self._checked:
                self._check_declared(name, items, [p for _, p in batch])
                self._checked.add(key)
            items = item = None  # the decoded copies go before the next parameter is decoded

    def _step_master(self, name: str, rule: UpdateRule, gi: int, pi: int, p: torch.Tensor, info: StepInfo) -> None:
        """One parameter through the master-weights layer (module docstring): restore, step, store."""
        from slimtrain.registry.tensors import is_dtensor

        master, spec, state = self.master, self.specs[p], self.state[p]
        local = _local(p)
        work = master.restore(local, state)
        grad = p.grad.to(master.master_dtype)
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor

            work = DTensor.from_local(work, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
        fuse = getattr(self.codec, "fused_step", None)
        buffers, micro = self._buffers.pop(p, None), self._micro.pop(p, 1)
        update = (rule.elementwise_update(spec) if fuse is not None and buffers is None and self._has_coded_state(p)
                  else None)
        if update is None or not fuse(update, self.declared[p], RuleParam(spec.name, spec, work, grad, state, pi, gi), info):
            item = RuleParam(spec.name, spec, work, grad, self._view(p), pi, gi, buffers, micro)
            rule.step([item], info)
            self._store(p, item.state)
            if (name, True) not in self._checked:
                self._check_declared(name, [item], [p])
                self._checked.add((name, True))
            item = None
        master.store(local, _local(work), state)

    @torch.no_grad()
    def step_params(self, params: Iterable[torch.Tensor]) -> None:
        """Step just ``params`` (those with a gradient) as part of step ``global_step + 1``."""
        wanted = set(params)
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, wanted)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, None)
        self.finish_step()
        return loss

    # -- momentum reset -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_state(self, params: Iterable[torch.Tensor], *, keep_counters: bool = False) -> int:
        """Apply each declaration's ``OnReset`` to the state of ``params`` (with ``keep_counters``,
        step counts declared ``counter=True`` are kept); returns how many parameters were reset."""
        done = 0
        for p in params:
            if p not in self.declared:
                continue
            view = self._view(p)
            for decl in self.declared[p]:
                if keep_counters and decl.counter:
                    continue
                if decl.on_reset is OnReset.ZERO:
                    _local(view[decl.name]).zero_()
                elif decl.on_reset is OnReset.INIT:
                    _local(view[decl.name]).fill_(decl.init_value)
            self._store(p, view)
            done += 1
        return done

    # -- checkpoints ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, then every declared tensor back in its declared dtype (and device)."""
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        by_id = {
            pid: p for sg, g in zip(saved_groups, self.param_groups) for pid, p in zip(sg["params"], g["params"])
        }
        super().load_state_dict(state_dict)
        for pid, values in saved_state.items():
            p = by_id.get(pid)
            if p is None or p not in self.declared:
                continue
            stored = self._stored_decls(p)
            for key, decl in stored.items():
                value = values.get(key)
                if not isinstance(value, torch.Tensor):
                    continue
                self.state[p][key] = self._placed(p, decl, key, value)
            for key in self.master.stored_keys() if self.master is not None else ():
                value, fresh = values.get(key), self.state[p].get(key)
                if isinstance(value, torch.Tensor) and isinstance(fresh, torch.Tensor):
                    # the layer's own storage keeps its own dtype (torch's loader cast it to the parameter's)
                    self.state[p][key] = value.detach().to(device=_local(fresh).device, dtype=value.dtype)

    def _stored_decls(self, p: torch.Tensor) -> dict[str, StateSpec]:
        out = {}
        for decl in self.declared[p]:
            keys = self.codec.stored_keys(decl) if self.coded(decl) else (decl.name,)
            for k in keys:
                out[k] = decl
        return out

    def _placed(self, p: torch.Tensor, decl: StateSpec, key: str, value: torch.Tensor) -> torch.Tensor:
        fresh = self.state[p][key]  # torch's cast copy: right device, maybe wrong dtype
        if self.coded(decl) and key != decl.name:
            dtype = value.dtype  # codec-owned storage keeps its own dtypes
        else:
            dtype = self.declared_dtype(p, decl)
        if decl.shape == () and decl.host:
            return value.detach().to(device="cpu", dtype=dtype).clone()
        device = _local(fresh).device if isinstance(fresh, torch.Tensor) else _local(p).device
        return value.detach().to(device=device, dtype=dtype)

    def describe(self) -> str:
        sizes = {}
        for g in self.param_groups:
            sizes[g["rule"]] = sizes.get(g["rule"], 0) + sum(p.numel() for p in g["params"])
        return ", ".join(f"{k}: {v} elements" for k, v in sizes.items())
