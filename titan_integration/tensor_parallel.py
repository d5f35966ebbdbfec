"""torchtitan's Llama tensor-parallel plan for parametrized Linears.

torchtitan's ``apply_tp`` shards each Linear through torch's ``ColwiseParallel`` / ``RowwiseParallel``,
whose partition functions re-register every ``module.named_parameters()`` entry as a DTensor; a
parametrized weight's originals live under ``parametrizations.weight.original<i>`` and torch
refuses the dotted name (``KeyError: parameter name can't contain "."``). The styles below shard a
parametrized Linear's originals instead, each as its parametrization declares
(``LinearParametrization.tp_dims``): column-wise (W's rows sharded) puts ``Shard(d_out)`` on each
original with an output dimension and replicates the others (low-rank: B ``Shard(0)``, A
replicated); row-wise (W's columns sharded) ``Shard(d_in)`` (A ``Shard(1)``, B replicated). The
parametrization's forward then computes on DTensors: column-wise ``x A^T`` is replicated and ``(x
A^T) B^T`` comes out ``Shard(-1)`` like a column-wise Linear's output; row-wise ``x A^T`` is a
partial sum, and so is ``(x A^T) B^T``, which the row-wise style reduce-scatters like a Linear's.
The factorization's rank is never split, so TP places no condition on it.

``parallelize_llama`` is torchtitan's own, run with these styles in place of torch's (the train spec's
``parallelize_fn``); an unparametrized Linear or Embedding is sharded exactly as before.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from slimtrain.registry.parametrization import parametrization_of


def _shard_originals(style, module: nn.Module, mesh, which: int) -> None:
    """Re-register ``module``'s originals as DTensors on ``mesh`` (``which``: 0 column-wise, 1 row-wise)."""
    p = parametrization_of(module)
    if not p.tp_dims:
        raise NotImplementedError(
            f"[{p.method}] its parametrization declares no tp_dims: it cannot follow a tensor-parallel plan "
            f"(the trainer refuses this before the model: titan_integration/parallel_checks.py)"
        )
    plist = module.parametrizations["weight"]
    for i, role in enumerate(p.roles):
        name = f"original{i}"
        orig = getattr(plist, name)
        dim = p.tp_dims[role][which]
        placement = Replicate() if dim is None else Shard(dim)
        plist.register_parameter(name, nn.Parameter(
            distribute_tensor(orig, mesh, [placement], src_data_rank=style.src_data_rank),
            requires_grad=orig.requires_grad))
    if getattr(module, "bias", None) is not None:
        placement = Shard(0) if which == 0 else Replicate()
        module.register_parameter("bias", nn.Parameter(
            distribute_tensor(module.bias, mesh, [placement], src_data_rank=style.src_data_rank),
            requires_grad=module.bias.requires_grad))


class FactorColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` that also shards a parametrized Linear (its originals, by ``tp_dims``)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name.startswith("parametrizations"):
            return  # the parametrization's own submodules: sharded with their Linear (name "")
        if parametrization_of(module) is not None:
            return _shard_originals(self, module, device_mesh, 0)
        return super()._partition_linear_fn(name, module, device_mesh)


class FactorRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` that also shards a parametrized Linear (its originals, by ``tp_dims``)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name.startswith("parametrizations"):
            return
        if parametrization_of(module) is not None:
            return _shard_originals(self, module, device_mesh, 1)
        return super()._partition_linear_fn(name, module, device_mesh)


@contextlib.contextmanager
def factor_styles():
    """torchtitan's Llama plan builds its styles from module globals at call time: swap them in."""
    from torchtitan.models.llama3.infra import parallelize as llama_parallelize

    saved = llama_parallelize.ColwiseParallel, llama_parallelize.RowwiseParallel
    llama_parallelize.ColwiseParallel, llama_parallelize.RowwiseParallel = FactorColwiseParallel, FactorRowwiseParallel
    try:
        yield
    finally:
        llama_parallelize.ColwiseParallel, llama_parallelize.RowwiseParallel = saved


def apply_tp(model: nn.Module, tp_mesh, **kwargs) -> None:
    """torchtitan's ``apply_tp`` with the factor-aware styles."""
    from torchtitan.models.llama3.infra.parallelize import apply_tp as titan_apply_tp

    with factor_styles():
        titan_apply_tp(model, tp_mesh, **kwargs)


def parallelize_llama(model: nn.Module, parallel_dims, job_config):
    """torchtitan's ``parallelize_llama`` with the factor-aware styles (the train spec's parallelize_fn)."""
    from torchtitan.models.llama3.infra.parallelize import parallelize_llama as titan_parallelize

    with factor_styles():
        return titan_parallelize(model, parallel_dims, job_config)
