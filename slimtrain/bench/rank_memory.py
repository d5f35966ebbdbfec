"""``slimtrain memory --device --dp-shard S --dp-replicate R --tp T``: what ONE rank holds on a
2-D mesh (slimtrain.registry.parallel_memory), one row per recipe, in GB (1e9 B)."""

from __future__ import annotations

from slimtrain.registry import llama_dense_specs

from slimtrain.bench.memory import recipe_composition
from slimtrain.titan_integration.flavors import PAPER_SHAPES, PAPER_VOCAB


def rank_row(recipe_name: str, flavor: str, *, batch: int, seq_len: int, ac: str, dp_shard: int,
             dp_replicate: int, tp: int, rank: int | None = None) -> dict:
    from slimtrain.registry.parallel_memory import Degrees, rank_memory

    shape = PAPER_SHAPES[flavor]
    recipe, comp, _, _ = recipe_composition(recipe_name, flavor, rank)
    m = rank_memory(
        comp, llama_dense_specs(shape.dim, shape.ffn, shape.n_layers, PAPER_VOCAB, shape.n_heads),
        degrees=Degrees(dp_shard, dp_replicate, tp), batch=batch,
        dim=shape.dim, ffn=shape.ffn, layers=shape.n_layers, heads=shape.n_heads, vocab=PAPER_VOCAB,
        seq_len=seq_len, ac=ac,
    )
    gb = lambda b: b / 1e9  # noqa: E731
    return {
        "recipe": recipe.name, "methods": comp.method_names, "flavor": flavor, "batch": batch,
        "local_batch": m.local_batch, "seq_len": seq_len, "ac": ac, "dp_shard": dp_shard,
        "dp_replicate": dp_replicate, "tp": tp, "weights_gb": gb(m.weights), "gradients_gb": gb(m.gradients),
        "optimizer_gb": gb(m.optimizer), "index_gb": gb(m.index), "activations_gb": gb(m.activations),
        "fsdp_buffers_gb": gb(m.fsdp_buffers), "total_gb": gb(m.total), "peak_gb": gb(m.peak),
        "one_device_peak_gb": gb(m.whole.peak),
    }


def format_rank_table(rows: list[dict]) -> str:
    out = [
        "| recipe | methods | weights | gradients | optimizer | index | activations | FSDP buffers | sum | peak (upper) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['recipe']} | {' + '.join(r['methods'])} | {r['weights_gb']:.3f} | {r['gradients_gb']:.3f} "
            f"| {r['optimizer_gb']:.3f} | {r['index_gb']:.3f} | {r['activations_gb']:.3f} | {r['fsdp_buffers_gb']:.3f} "
            f"| {r['total_gb']:.3f} | {r['peak_gb']:.3f} |"
        )
    return "\n".join(out)
