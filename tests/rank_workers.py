"""Launch a test file as its own worker script on ``world`` gloo ranks and collect what each rank
saved (``rank<r>.pt`` in ``out_dir``).

The FSDP2 equality tests (tests/methods/test_parametrized_fsdp.py, test_frontier_fsdp.py,
tests/optim/test_per_layer_updates.py) each run fresh processes: a process group cannot be
re-initialized in the pytest process, and fresh processes keep the ranks' RNG and thread settings
independent of test order. The worker reads RANK, WORLD_SIZE, SHARD and OUT_DIR from its environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: str | Path, world: int, shard: bool, out_dir: Path, *, timeout: float = 180) -> list[dict]:
    """Run ``script`` once per rank (``world`` processes, one thread each) and load their results.
    A rank that fails fails the test with the tail of its log."""
    out_dir.mkdir()
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   SHARD="1" if shard else "0", OUT_DIR=str(out_dir), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    logs = [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {world} failed:\n{log[-4000:]}"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def build_model(comp, tiny: dict, *, world: int, shard: bool, seed_label: str, replicate: int = 1, tp: int = 1):
    """A small torchtitan LLaMA with ``comp``'s parametrizations, FSDP2-sharded per block when
    ``shard``, every parameter written from a generator seeded by ``seed_label`` and its name (a
    rank-independent stand-in for the model's own init: torch's RNG on DTensor shards is not), then
    the parametrizations initialized. ``replicate > 1``: HSDP, a (replicate, world / replicate)
    mesh whose parameters are ``(Replicate(), Shard(0))``, as torchtitan's
    ``data_parallel_replicate_degree`` builds it. ``tp > 1``: torchtitan's Llama TP plan on a
    (world / tp, tp) mesh ("dp_shard", "tp"), then FSDP2 over "dp_shard" (no loss parallelism: the
    output is gathered)."""
    from slimtrain.titan_integration import cpu_shim

    cpu_shim.apply()  # before torchtitan's first import in this process (a no-op with an accelerator)
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    from slimtrain.registry.parametrization import seeded_generator
    from slimtrain.registry.tensors import write_full_

    with torch.device("meta"):
        model = Transformer(TransformerModelArgs(**tiny))
    comp.apply_parametrizations(model)  # before sharding
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if tp > 1:
            from slimtrain.titan_integration.tensor_parallel import apply_tp

            mesh2 = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp_shard", "tp"))
            apply_tp(model, mesh2["tp"], loss_parallel=False, enable_float8_tensorwise_tp=False)
            mesh = mesh2["dp_shard"]
        elif replicate > 1:
            mesh = init_device_mesh("cpu", (replicate, world // replicate), mesh_dim_names=("dp_replicate", "dp_shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            g = seeded_generator(seed_label, pname)
            value = torch.ones(p.shape) if p.ndim == 1 else torch.randn(tuple(p.shape), generator=g) * 0.05
            write_full_(p, value)
        model.freqs_cis = model._precompute_freqs_cis()
    comp.init_parametrized(model)
    return model
