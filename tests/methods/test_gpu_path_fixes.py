"""Fixes found by running the GPU path (bf16 autocast, op-level selective activation
checkpointing, torch.compile) on CPU; branch i15 has the end-to-end runs (tests/integration)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from slimtrain.plugins.low_rank import LowRankParametrization
from slimtrain.plugins.sltrain import dense_weight, draw_support, sparse_lowrank_linear
from slimtrain.registry.parametrization import attach, bake, parametrization_of


def _sl_inputs(m=16, n=12, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = draw_support(0, "w", m, n, 0.1)
    b = torch.randn(m, r, generator=g, requires_grad=True)
    a = torch.randn(r, n, generator=g, requires_grad=True)
    v = torch.randn(index.numel(), generator=g, requires_grad=True)
    x = torch.randn(5, n, generator=g, requires_grad=True)
    return x, b, a, v, index


def test_sltrain_layer_under_autocast_computes_in_bf16_and_returns_fp32_grads():
    x, b, a, v, index = _sl_inputs()
    ref = sparse_lowrank_linear(x, b, a, v, index, 0.5)
    ref.sum().backward()
    ref_grads = [t.grad.clone() for t in (x, b, a, v)]
    for t in (x, b, a, v):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_lowrank_linear(x, b, a, v, index, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # failed before: bf16 gradient @ fp32 input in backward
    for t, g in zip((x, b, a, v), ref_grads):
        assert t.grad.dtype == torch.float32
        assert torch.allclose(t.grad, g, rtol=0.05, atol=0.05 * g.abs().max().item())


def test_dense_weight_matches_its_definition():
    x, b, a, v, index = _sl_inputs()
    w = (0.5 * b @ a).reshape(-1).index_add(0, index, v).reshape(b.shape[0], a.shape[1])
    assert torch.allclose(dense_weight(b, a, v, index, 0.5), w, atol=1e-6)


def test_sltrain_layer_under_op_level_selective_checkpointing():
    """torchtitan's op-level SAC saves matmul outputs; W was built by writing into one in place."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) \
            else CheckpointPolicy.PREFER_RECOMPUTE

    x, b, a, v, index = _sl_inputs()
    ref = sparse_lowrank_linear(x, b, a, v, index, 0.5).sum()
    gref = torch.autograd.grad(ref, (b, a, v))
    y = checkpoint(lambda *t: sparse_lowrank_linear(*t, index, 0.5), x, b, a, v, use_reentrant=False,
                   context_fn=functools.partial(create_selective_checkpoint_contexts, policy)).sum()
    g = torch.autograd.grad(y, (b, a, v))
    for got, want in zip(g, gref):
        assert torch.allclose(got, want, atol=1e-5)


def test_parametrized_linears_share_one_class_and_bake_keeps_the_others():
    """torch.compile guards on submodule types: a class per module made every block recompile
    (one recompilation per transformer block, past the limit of 8 at 1b)."""
    layers = [nn.Linear(8, 8, bias=False) for _ in range(3)]
    for lin in layers:
        p = LowRankParametrization(8, 8, 2, 1.0, "normal", 0.02, 0)
        attach(lin, p)
        plist = lin.parametrizations.weight
        p.initialize({"B": plist.original0, "A": plist.original1}, "x")
    assert len({type(lin) for lin in layers}) == 1
    x = torch.randn(4, 8)
    w, y = layers[0].weight.detach().clone(), layers[0](x)
    bake(layers[0])
    assert type(layers[0]) is nn.Linear and torch.equal(layers[0].weight, w)
    assert torch.allclose(layers[0](x), y, atol=1e-6)
    assert all(parametrization_of(lin) is not None for lin in layers[1:])
    assert layers[1].weight.shape == (8, 8) and layers[1](x).shape == (4, 8)


def test_compiled_blocks_with_parametrized_linears_do_not_recompile_per_block():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 8, bias=False)
            attach(self.w, LowRankParametrization(8, 8, 2, 1.0, "normal", 0.02, 0))

        def forward(self, x):
            return x + self.w(x)

    blocks = [Block() for _ in range(5)]
    for blk in blocks:
        blk.compile(fullgraph=True, backend="eager")
    x = torch.randn(2, 8)
    for blk in blocks:
        x = blk(x)
    # at most one recompilation in all (without the shared class: one per block, 5 graphs)
    assert counters["stats"]["unique_graphs"] <= 2, {k: dict(v) for k, v in counters.items()}
