"""Row-sharded matrix math for optimizer rules under FSDP2, with one code path for plain tensors.

FSDP2 shards every parameter, its gradient and row-aligned state ``Shard(0)`` on a 1-D mesh; HSDP
(torchtitan's ``data_parallel_replicate_degree``) places them ``(Replicate(), Shard(0))`` on a 2-D
mesh, and everything here then works inside one replica group (the shard dimension's process
group): replicas hold identical gradients after FSDP2's reduce-scatter + all-reduce, so each
replica group computes the same result without talking to the others. A rule
that needs whole-matrix math must not silently all-gather (``torch.linalg.svd`` on a DTensor does,
on every rank). ``RowShards`` wraps a gradient as this rank's row block plus the collectives that
combine blocks, so a rule writes its math once and it runs unsharded (one "shard", no collectives)
and sharded alike:

* ``allreduce``: sums a per-shard product, e.g. ``G^T X = sum_k G_k^T X_k`` (n x l, small);
* ``gather_rows``: the full m x k matrix whose rows are spread like G's (for thin matrices only);
* ``my_rows``: this rank's rows of a replicated m x k matrix.

Tensor parallelism shards a weight twice: column-wise Linears ``(_StridedShard(0), Shard(0))`` (FSDP2's
rows inside TP's rows), row-wise Linears ``(Shard(0), Shard(1))`` (TP shards the COLUMNS). A rule
that is not elementwise on any shard (``UpdateRule.any_placement`` False) sees such a parameter
through its *row view* (``row_view``): the same DTensor redistributed to ``row_placements`` --
``Shard(0)`` on the first mesh dimension that shards its rows (FSDP2's), ``Replicate()`` on the others
(TP's) -- so its math is FSDP2's over the data-parallel group, with whole rows. The TP ranks of one
data-parallel rank hold the same row view and compute the same result (their collectives run in their
own data-parallel groups); ``write_back`` redistributes the updated view into the parameter's own
layout. Cost per rank per step: the gradient and the parameter gathered over TP (``(tp - 1) / tp``
of the row view each), plus the write-back's reshuffle of column-wise rows; the rule's ``rows`` state
is kept in the row view's layout (``ComposedOptimizer`` creates it so), i.e. divided by the
data-parallel degree only.
"""

from __future__ import annotations

import torch


def row_shard_mesh_dim(placements) -> int | None:
    """The mesh dimension along which a DTensor is row-sharded when it is ``Shard(0)`` on exactly
    one mesh dimension and ``Replicate()`` on every other (FSDP2 on a 1-D mesh: ``(Shard(0),)``;
    HSDP: ``(Replicate(), Shard(0))``); None for any other layout (tensor parallelism, partial sums)."""
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = [i for i, p in enumerate(placements) if p == Shard(0)]
    others_replicated = all(p == Replicate() for i, p in enumerate(placements) if i not in shard_dims)
    if len(shard_dims) == 1 and others_replicated:
        return shard_dims[0]
    return None


def _shards_rows(p) -> bool:
    """``Shard(0)`` or FSDP2's ``_StridedShard(0)`` (rows inside TP's rows)."""
    return not p.is_replicate() and not p.is_partial() and getattr(p, "dim", None) == 0


def row_placements(placements) -> tuple:
    """The layout a row-based rule works in (see the module docstring): ``Shard(0)`` on the first mesh
    dimension that shards rows, ``Replicate()`` on every other; all ``Replicate()`` when none does
    (a weight only TP shards, on its columns)."""
    from torch.distributed.tensor import Replicate, Shard

    out, found = [], False
    for p in placements:
        if not found and _shards_rows(p):
            out.append(Shard(0))
            found = True
        else:
            out.append(Replicate())
    return tuple(out)


def needs_row_view(t: torch.Tensor) -> bool:
    """Whether a row-based rule must see ``t`` through ``row_view`` (a DTensor not in row layout)."""
    from slimtrain.registry.tensors import is_dtensor

    return is_dtensor(t) and tuple(t.placements) != row_placements(t.placements)


def row_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` redistributed to ``row_placements`` (``t`` itself when it already is in row layout)."""
    if not needs_row_view(t):
        return t
    return t.redistribute(t.device_mesh, row_placements(t.placements))


@torch.no_grad()
def write_back(view: torch.Tensor, param: torch.Tensor) -> None:
    """Copy an updated row view into ``param`` (its own layout) in place."""
    if view is param:
        return
    param.to_local().copy_(view.redistribute(param.device_mesh, param.placements).to_local())


class RowShards:
    """A gradient as this rank's row block plus the collectives needed to combine blocks."""

    def __init__(self, grad: torch.Tensor):
        from slimtrain.registry.tensors import is_dtensor

        self.shape = tuple(grad.shape)
        self.dist = False
        if is_dtensor(grad):
            from torch.distributed.tensor import Shard

            mesh, placements = grad.device_mesh, grad.placements
            shard_dim = row_shard_mesh_dim(placements)
            if shard_dim is None and all(p.is_replicate() for p in placements):
                # whole on every rank (the row view of a weight only TP shards): unsharded math
                self.row0, self.rows = 0, grad.shape[0]
                self.local = grad.to_local().float()
                return
            if shard_dim is None:
                raise NotImplementedError(
                    f"row-sharded math supports plain tensors and DTensors sharded on rows along one mesh "
                    f"dimension, replicated along the others (FSDP2: Shard(0); HSDP: Replicate(), Shard(0)); "
                    f"got placements {placements} on a {mesh.ndim}-D mesh (tensor parallelism shards "
                    f"columns or rows twice: pass the gradient's slimtrain.registry.sharded.row_view)"
                )
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local_shape, offset = compute_local_shape_and_global_offset(grad.shape, mesh, placements)
            self.dist = True
            self.mesh = mesh
            self.placements = placements
            # only the shard dimension: replicas hold the same rows and the same (all-reduced) gradient,
            # so every collective and every owner's whole-matrix math stays inside one replica group
            self.group = mesh.get_group(shard_dim)
            self.row0 = int(offset[0])
            self.rows = int(local_shape[0])
            self.local = grad.to_local().float()
        else:
            self.row0, self.rows = 0, grad.shape[0]
            self.local = grad.detach().float()

    def my_rows(self, full_rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a replicated m x k matrix."""
        return full_rows[self.row0 : self.row0 + self.rows]

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The m x k matrix whose rows are spread over ranks like G's."""
        if not self.dist:
            return local
        from torch.distributed.tensor import DTensor

        m, k = self.shape[0], local.shape[1]
        return DTensor.from_local(local.contiguous(), self.mesh, self.placements, shape=(m, k), stride=(k, 1)).full_tensor()


class OwnerRanks:
    """Whole-matrix math on row-sharded gradients, one owner rank per matrix.

    For math that no all-reduce of a small product can give (an exact SVD, Newton-Schulz): the
    matrices of one step are spread over the ranks in chunks of world size; within a chunk every
    rank takes part in gathering each matrix (``gather``, a collective), only its owner computes
    (``compute``), and the owner broadcasts the result to all. Owners rotate across chunks and
    across calls (``turn`` advances identically on every rank), so a short chunk or a one-matrix
    group does not always land on rank 0. Unsharded (no process group), everything is computed here.
    Bytes moved per rank: the gather of each matrix plus the broadcast of each result.
    """

    def __init__(self) -> None:
        self.turn = 0

    def run(self, jobs, *, gather, compute, result_shape, group=None, device=None, dtype=torch.float32) -> list:
        """``[compute(job, gather(job)) for job in jobs]``, each computed on one rank only."""
        if group is None:
            return [compute(job, gather(job)) for job in jobs]
        import torch.distributed as dist

        world = dist.get_world_size(group)
        me = dist.get_rank(group)
        out: list = [None] * len(jobs)
        for start in range(0, len(jobs), world):
            chunk = jobs[start : start + world]
            owners = [(self.turn + j) % world for j in range(len(chunk))]
            self.turn = (self.turn + len(chunk)) % world
            mine = {}
            for j, job in enumerate(chunk):
                full = gather(job)  # collective: every rank takes part
                if owners[j] == me:
                    mine[j] = compute(job, full).to(dtype).contiguous()
                del full
            for j, job in enumerate(chunk):
                buf = mine[j] if j in mine else torch.empty(result_shape(job), dtype=dtype, device=device)
                dist.broadcast(buf, src=dist.get_global_rank(group, owners[j]), group=group)
                out[start + j] = buf
        return out
