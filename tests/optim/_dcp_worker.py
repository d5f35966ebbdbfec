"""Spawned worker for the checkpoint round-trip tests: FSDP2 (fully_shard) on gloo/CPU.

For each recipe: train ``STEPS`` steps, save model and optimizer state with torch.distributed.checkpoint
(through ``get_model_state_dict`` / ``get_optimizer_state_dict``, as torchtitan does), train ``STEPS``
more; then build a fresh, differently initialized model and optimizer, load the checkpoint (through
``set_*_state_dict``) and train the same ``STEPS`` more. Results go to ``out_dir`` as tensors.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STEPS = 3
LR = 0.01

RECIPES = {
    "adamw": (["adamw"], {}),
    "galore": (["galore"], {"galore": {"rank": 4, "update_proj_gap": 2, "targets": ["0", "2"]}}),
    "galore_svd": (
        ["galore"],
        {"galore": {"rank": 4, "update_proj_gap": 2, "targets": ["0", "2"], "proj_method": "svd"}},
    ),
    "fira": (["fira"], {"fira": {"rank": 4, "update_proj_gap": 2, "targets": ["0", "2"]}}),
    "galore_reset": (
        ["galore", "momentum_reset"],
        {
            "galore": {"rank": 4, "update_proj_gap": 3, "targets": ["0", "2"]},
            "momentum_reset": {"every": 2, "warmup_steps": 2},
        },
    ),
}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # 41 rows: uneven shards on 2 ranks; weight 0 (41 x 24) projects right, weight 2 (24 x 41) left
    return nn.Sequential(nn.Linear(24, 41), nn.Tanh(), nn.Linear(41, 24))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 24, generator=g)
    return x, torch.sin(x * 2.0)


def build(recipe: str, seed: int, fsdp: bool):
    from torch.distributed.fsdp import fully_shard

    from slimtrain.registry import OptimizerHyper, StepContext, compose

    names, sections = RECIPES[recipe]
    comp = compose(names, sections)
    model = make_model(seed)
    if fsdp:
        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    optim = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=LR, weight_decay=0.1))
    for g in optim.param_groups:
        g["initial_lr"] = LR
    return comp, model, optim, StepContext


def train(comp, model, optim, StepContext, first: int, last: int) -> None:
    for step in range(first, last + 1):
        for g in optim.param_groups:
            g["lr"] = g["initial_lr"] * comp.lr_factor(step)
        x, y = batch(step)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
        comp.after_step(StepContext(step=step, model_parts=[model], optimizers=[optim]))


def full_params(model) -> dict[str, torch.Tensor]:
    from slimtrain.registry.tensors import full_tensor

    return {k: full_tensor(v).clone() for k, v in model.named_parameters()}


def worker(rank: int, world: int, init_file: str, out_dir: str, recipes: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for recipe in recipes:
            ckpt = os.path.join(out_dir, f"ckpt_{recipe}_{world}")
            comp, model, optim, Ctx = build(recipe, 0, fsdp=True)
            train(comp, model, optim, Ctx, 1, STEPS)
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}, checkpoint_id=ckpt)
            saved_state = {
                k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                for k, v in _flat_state(optim).items()
            }
            train(comp, model, optim, Ctx, STEPS + 1, 2 * STEPS)
            straight = full_params(model)

            comp2, model2, optim2, _ = build(recipe, 123, fsdp=True)
            sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, optim2)}
            dcp.load(sd, checkpoint_id=ckpt)
            set_model_state_dict(model2, sd["model"])
            set_optimizer_state_dict(model2, optim2, sd["optim"])
            loaded_state = {
                k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                for k, v in _flat_state(optim2).items()
            }
            train(comp2, model2, optim2, Ctx, STEPS + 1, 2 * STEPS)
            resumed = full_params(model2)
            if rank == 0:
                torch.save(
                    {"straight": straight, "resumed": resumed, "saved_state": saved_state, "loaded_state": loaded_state},
                    os.path.join(out_dir, f"result_{recipe}_{world}.pt"),
                )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _flat_state(optim) -> dict[str, torch.Tensor]:
    out = {}
    for gi, group in enumerate(optim.param_groups):
        for pi, p in enumerate(group["params"]):
            for key, value in optim.state[p].items():
                if isinstance(value, torch.Tensor):
                    out[f"{gi}.{pi}.{key}"] = value
    return out
