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
            if shard_dim is None:
                raise NotImplementedError(
                    f"row-sharded math supports plain tensors and DTensors sharded on rows along one mesh "
                    f"dimension, replicated along the others (FSDP2: Shard(0); HSDP: Replicate(), Shard(0)); "
                    f"got placements {placements} on a {mesh.ndim}-D mesh (tensor parallelism shards "
                    f"columns or rows twice: the trainer refuses that before the model is built)"
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
