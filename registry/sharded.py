"""Row-sharded matrix math for optimizer rules under FSDP2, with one code path for plain tensors.

FSDP2 shards every parameter, its gradient and row-aligned state ``Shard(0)`` on a 1-D mesh. A rule
that needs whole-matrix math must not silently all-gather (``torch.linalg.svd`` on a DTensor does,
on every rank). ``RowShards`` wraps a gradient as this rank's row block plus the collectives that
combine blocks, so a rule writes its math once and it runs unsharded (one "shard", no collectives)
and sharded alike:

* ``allreduce``: sums a per-shard product, e.g. ``G^T X = sum_k G_k^T X_k`` (n x l, small);
* ``gather_rows``: the full m x k matrix whose rows are spread like G's (for thin matrices only);
* ``my_rows``: this rank's rows of a replicated m x k matrix.

Math that needs the whole matrix runs on one owner rank per matrix instead (``OwnerRotation``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class RowShards:
    """A gradient as this rank's row block plus the collectives needed to combine blocks."""

    def __init__(self, grad: torch.Tensor):
        from registry.tensors import is_dtensor

        self.shape = tuple(grad.shape)
        self.dist = False
        if is_dtensor(grad):
            from torch.distributed.tensor import Shard

            mesh, placements = grad.device_mesh, grad.placements
            if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
                raise NotImplementedError(
                    f"row-sharded math supports plain tensors and Shard(0) DTensors on a 1-D mesh "
                    f"(FSDP2); got placements {placements} on a {mesh.ndim}-D mesh"
                )
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local_shape, offset = compute_local_shape_and_global_offset(grad.shape, mesh, placements)
            self.dist = True
            self.mesh = mesh
            self.placements = placements
            self.group = mesh.get_group(0)
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


class OwnerRotation:
    """Whole-matrix math under FSDP2, spread over ranks by matrix, for what needs the full matrix
    (an exact SVD, Newton-Schulz): the matrices of one step are taken in chunks of world size;
    for each chunk every rank takes part in gathering each matrix (the collective needs all), the
    chunk's j-th matrix is computed on one owner only, and each result is broadcast from its owner.
    Each rank computes 1/world of the matrices. Owners rotate across chunks, calls and steps (the
    turn advances identically on every rank), so a short chunk or a one-matrix group does not
    always land on rank 0. Which rank computes a result does not change it: every owner sees the
    same full matrix.
    """

    def __init__(self) -> None:
        self.turn = 0

    def compute(
        self,
        jobs: list[tuple[RowShards, Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], tuple[int, ...]]],
    ) -> list[torch.Tensor]:
        """``jobs``: (rows, gather_full, fn, out_shape) per matrix, all on the same process group;
        ``gather_full()`` is a collective returning the full matrix, ``fn(full)`` the fp32 result of
        shape ``out_shape``. Returns the results in order, identical on every rank."""
        import torch.distributed as dist

        if not jobs:
            return []
        group = jobs[0][0].group
        world, me = dist.get_world_size(group), dist.get_rank(group)
        out: list[torch.Tensor] = []
        for start in range(0, len(jobs), world):
            chunk = jobs[start : start + world]
            owners = [(self.turn + j) % world for j in range(len(chunk))]
            self.turn = (self.turn + len(chunk)) % world
            mine: dict[int, torch.Tensor] = {}
            for j, (_, gather_full, fn, _) in enumerate(chunk):
                full = gather_full()
                if owners[j] == me:
                    mine[j] = fn(full).contiguous()
                del full
            for j, (rows, _, _, shape) in enumerate(chunk):
                buf = mine.get(j)
                if buf is None:
                    buf = torch.empty(shape, dtype=torch.float32, device=rows.local.device)
                dist.broadcast(buf, src=dist.get_global_rank(group, owners[j]), group=group)
                out.append(buf)
        return out
