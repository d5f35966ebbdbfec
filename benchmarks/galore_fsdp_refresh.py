"""Benchmark: what one GaLore projection refresh moves and computes on each rank under FSDP2.

Spawns ``--world`` (default 2) gloo ranks on CPU, builds a few bias-free Linear layers, ``fully_shard``s
each (Shard(0) DTensor parameters and gradients), runs one forward/backward and then, per refresh
method, optimizer steps of ``slimtrain.plugins.galore.projected_adamw.ProjectedAdamW`` on that gradient:

* ``randomized``: the shipped sharded randomized range finder (no gradient is gathered);
* ``svd``: the shipped exact refresh, SVDs spread round-robin over ranks and broadcast;
* ``naive svd`` (baseline, implemented here): every rank gathers every full gradient with
  ``DTensor.full_tensor()`` and computes the same ``torch.linalg.svd``;
* ``naive randomized`` (baseline, implemented here): every rank gathers the full gradient and runs the
  randomized range finder on it locally;
* a non-refresh step (projection kept) for reference.

Per rank it records, for one step: collective calls by op and their payload (a TorchDispatchMode sees
every ``c10d`` op, i.e. ``torch.distributed.all_reduce`` / ``broadcast`` / ``all_gather*`` /
``reduce_scatter*``, and every ``_c10d_functional`` op, i.e. the DTensor redistribute / full_tensor
path), matmul GFLOPs and the SVDs it runs (aten level), and the wall time of the step (minimum over
``--repeats``, timed in separate runs without the counting mode, each rank on one thread).

Bytes sent/received are modelled from the payloads for the usual algorithms: all-reduce of N bytes
(ring) sends and receives 2 N (w-1)/w; all-gather into N_out sends its input to each of the w-1
peers, receiving N_out - N_in; broadcast: the root sends N (w-1), every other rank receives N.

    .venv/bin/python benchmarks/galore_fsdp_refresh.py [--big] [--repeats 3]

``--big`` adds one 2048 x 5461 matrix at rank 512 (its own param group, as a different rank needs).
The table it prints is the one in ``docs/benchmarks/galore_refresh.md`` (section "Under FSDP2").
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from slimtrain.plugins.galore.projected_adamw import ProjectedAdamW  # noqa: E402
from slimtrain.registry.sharded import RowShards  # noqa: E402
from slimtrain.registry.subspace import randomized_range, svd_projection  # noqa: E402

SMALL = [(512, 512), (1376, 512), (512, 1376)]  # weight shapes (out x in): right, right, left side
SMALL_RANK = 128
BIG = (2048, 5461)  # left side
BIG_RANK = 512
TOKENS = 1024  # > every dimension of SMALL: full-rank gradients
_NOT_COLLECTIVES = {"wait_tensor", "_wrap_tensor_autograd", "barrier"}
METHODS = ["randomized", "svd", "naive randomized", "naive svd"]


# --------------------------------------------------------------------------------------------------
class Counter(TorchDispatchMode):
    """Counts collectives (calls and payload bytes), matmul FLOPs and SVDs seen at the aten level."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.rank, self.world = rank, world
        self.calls = collections.Counter()
        self.payload = collections.Counter()
        self.sent = 0
        self.recv = 0
        self.flops = 0
        self.svds: list[tuple[int, int]] = []
        self.qrs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns = func.namespace
        name = func._schema.name.split("::")[-1]
        w = self.world
        if ns in ("c10d", "_c10d_functional") and name not in _NOT_COLLECTIVES:
            tin = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            tout = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            n_in = sum(t.nbytes for t in tin)
            n_out = sum(t.nbytes for t in tout)
            op = name.rstrip("_")
            if ns == "_c10d_functional":
                op = "funcol." + op
            self.calls[op] += 1
            if "allreduce" in name or "all_reduce" in name:
                n = n_out if ns == "_c10d_functional" else n_in
                self.payload[op] += n
                self.sent += 2 * n * (w - 1) // w
                self.recv += 2 * n * (w - 1) // w
            elif "broadcast" in name:
                if ns == "c10d":  # broadcast_(tensors, process_group, root_rank, root_tensor, ...)
                    n, root = sum(t.nbytes for t in args[0]), int(args[2])
                else:  # broadcast(input, src, group_name)
                    n, root = n_in, int(args[1])
                self.payload[op] += n
                if dist.get_rank() == root:  # one 1-D group: group rank == global rank here
                    self.sent += n * (w - 1)
                else:
                    self.recv += n
            elif "gather" in name:
                if ns == "c10d" and name.endswith("allgather_"):  # allgather_(outputs, inputs, ...)
                    n_out = sum(t.nbytes for t in tree_leaves(args[0]))
                    n_in = sum(t.nbytes for t in tree_leaves(args[1]))
                elif ns == "c10d":  # _allgather_base_(output, input, ...)
                    n_out, n_in = args[0].nbytes, args[1].nbytes
                else:
                    n_in = args[0].nbytes
                self.payload[op] += n_out
                self.sent += n_in * (w - 1)
                self.recv += n_out - n_in
            elif "reduce_scatter" in name:
                self.payload[op] += n_in
                self.sent += n_in * (w - 1) // w
                self.recv += n_in * (w - 1) // w
            else:
                self.payload[op] += n_in
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = (args[0], args[1]) if func is torch.ops.aten.mm.default else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif func is torch.ops.aten._linalg_svd.default:
            a = args[0]
            if not torch.equal(a, a.triu()):  # the randomized refresh's l x l SVD is of a QR triangle
                self.svds.append(tuple(a.shape))
        elif func is torch.ops.aten.linalg_qr.default:
            self.qrs += 1
        return out

    def summary(self) -> dict:
        return {
            "calls": dict(self.calls), "payload": dict(self.payload), "sent": self.sent, "recv": self.recv,
            "flops": self.flops, "svds": list(self.svds), "qrs": self.qrs,
        }


# --------------------------------------------------------------------------------------------------
class NaiveProjectedAdamW(ProjectedAdamW):
    """Baseline: every rank gathers the full gradient (DTensor.full_tensor()) and refreshes from it."""

    def compute_projection(self, group, rows, side, seed):
        from torch.distributed.tensor import DTensor

        m, n = rows.shape
        full = DTensor.from_local(rows.local, rows.mesh, rows.placements, shape=(m, n), stride=(n, 1)).full_tensor()
        rank = int(group["proj_rank"])
        if group["proj_method"] == "naive svd":
            return svd_projection(full, rank, side)
        return randomized_range(RowShards(full), rank, side, power_iters=int(group.get("proj_power_iters", 2)), seed=seed)


class Model(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False) for o, i in shapes)

    def forward(self, xs):
        return sum(((layer(x) - 0.1) ** 2).mean() for layer, x in zip(self.layers, xs))


def build(method: str, shapes, ranks):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Model(shapes)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    groups: dict[int, list] = {}
    for layer, r in zip(model.layers, ranks):
        groups.setdefault(r, []).append(layer.weight)
    cls = NaiveProjectedAdamW if method.startswith("naive") else ProjectedAdamW
    param_groups = [
        dict(params=ps, proj_rank=r, proj_gap=1, proj_scale=0.25, proj_method=method) for r, ps in groups.items()
    ]
    optim = cls(param_groups, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(TOKENS, i, generator=gen) for _, i in shapes]
    model(xs).backward()
    return model, optim


def set_gap(optim, gap: int) -> None:
    for g in optim.param_groups:
        g["proj_gap"] = gap


def timed_step(optim) -> float:
    dist.barrier()
    t = time.perf_counter()
    optim.step()
    return time.perf_counter() - t


def worker(rank: int, world: int, init_file: str, out_file: str, big: bool, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shapes = SMALL + ([BIG] if big else [])
    ranks = [SMALL_RANK] * len(SMALL) + ([BIG_RANK] if big else [])
    results = {}
    try:
        for method in METHODS:
            model, optim = build(method, shapes, ranks)
            optim.step()  # first step: creates the state (and refreshes)
            kinds = [("refresh", 1)] + ([("no refresh", 10**9)] if method == "randomized" else [])
            for kind, gap in kinds:
                set_gap(optim, gap)
                with Counter(rank, world) as c:
                    optim.step()
                times = [timed_step(optim) for _ in range(repeats)]
                results[(method, kind)] = dict(c.summary(), time=min(times))
            del model, optim
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out_file)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def table(per_rank: list[dict], world: int, shapes) -> str:
    lines = [
        "| step | rank | collectives (calls by op) | payload MB | sent / recv MB | matmul GFLOP | full SVDs computed | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = [(m, "refresh") for m in METHODS] + [("randomized", "no refresh")]
    for key in keys:
        method, kind = key
        label = f"{method}, {kind}" if kind == "refresh" else "any method, no refresh"
        for r in range(world):
            d = per_rank[r][key]
            calls = ", ".join(f"{op} x{n}" for op, n in sorted(d["calls"].items())) or "none"
            big_svds = [s for s in d["svds"] if s in shapes]  # not the l x l SVDs of the sketch
            svds = ", ".join(f"{a}x{b}" for a, b in big_svds) or "-"
            lines.append(
                f"| {label} | {r} | {calls} | {_mb(sum(d['payload'].values()))} | {_mb(d['sent'])} / {_mb(d['recv'])} "
                f"| {d['flops'] / 1e9:.2f} | {svds} | {d['time'] * 1e3:.0f} ms |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--big", action="store_true", help="add a 2048 x 5461 matrix at rank 512")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pt")
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "init"), out_file, args.big, args.repeats), nprocs=args.world, join=True)
        per_rank = torch.load(out_file, weights_only=False)
    shapes = SMALL + ([BIG] if args.big else [])
    ranks = [SMALL_RANK] * len(SMALL) + ([BIG_RANK] if args.big else [])
    desc = ", ".join(f"{m} x {n} (rank {r})" for (m, n), r in zip(shapes, ranks))
    print(f"weights: {desc}; world {args.world}\n")
    print(table(per_rank, args.world, [tuple(s) for s in shapes]))


if __name__ == "__main__":
    main()
