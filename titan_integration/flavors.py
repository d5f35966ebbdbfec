"""Model flavors: the LLaMA sizes of the GaLore/SLTrain/Fira papers, plus ``tiny`` for CPU runs.

Why plain ``TransformerModelArgs`` and no subclass: torchtitan's llama3 ``FeedForward`` derives its
hidden size as ``multiple_of * ceil(int(ffn_dim_multiplier * int(8 * dim / 3)) / multiple_of)``.
For every paper size a ``multiple_of`` exists that lands exactly on the paper's FFN width (1376,
2048, 2736, 5461, 11008), so the stock model class (and its parallelize/pipelining/state-dict
code) is used unchanged. ``ffn_hidden_dim`` recomputes the width with torchtitan's formula, and
``check_flavors`` asserts it against the paper's table at import, so a torchtitan change that moved
the formula would fail loudly instead of training a different model.

Paper table (GaLore / SLTrain / Fira papers): hidden, FFN, layers, heads; vocab 32000 (T5 tokenizer).
"""

from __future__ import annotations

import dataclasses

from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

from torchtitan.models.llama3 import TransformerModelArgs  # noqa: E402

PAPER_VOCAB = 32000


@dataclasses.dataclass(frozen=True)
class PaperShape:
    dim: int
    ffn: int
    n_layers: int
    n_heads: int
    multiple_of: int  # chosen so torchtitan's FFN formula yields ``ffn`` exactly
    rank: int  # the papers' factorization rank at this size (recipes carry 60M's; the bench sets it per flavor)


PAPER_SHAPES: dict[str, PaperShape] = {
    "60m": PaperShape(dim=512, ffn=1376, n_layers=8, n_heads=8, multiple_of=32, rank=128),
    "130m": PaperShape(dim=768, ffn=2048, n_layers=12, n_heads=12, multiple_of=256, rank=256),
    "350m": PaperShape(dim=1024, ffn=2736, n_layers=24, n_heads=16, multiple_of=16, rank=256),
    "1b": PaperShape(dim=2048, ffn=5461, n_layers=24, n_heads=32, multiple_of=1, rank=512),
    "7b": PaperShape(dim=4096, ffn=11008, n_layers=32, n_heads=32, multiple_of=256, rank=1024),
}

# ``tiny``: for CPU runs (a few hundred steps in minutes on 2 cores). dim 256 so that the recipes'
# paper rank 128 still fits and is a real low rank (half the width); the embedded corpus prepares
# a tokenizer of exactly its vocab (a larger tokenizer is refused before training; see data.py).
# Its run-scale defaults (batch, validation, checkpoint interval) are in run_defaults.py.
TINY_VOCAB = 4096
TINY = PaperShape(dim=256, ffn=688, n_layers=4, n_heads=4, multiple_of=16, rank=128)
# ``nano``: the smallest shapes, for fast integration tests of the plumbing (ranks must be <= 32)
NANO = PaperShape(dim=32, ffn=96, n_layers=2, n_heads=2, multiple_of=16, rank=8)

SHAPES: dict[str, PaperShape] = {**PAPER_SHAPES, "tiny": TINY, "nano": NANO}

# Method settings the papers change with size (methods.md), beyond the rank: SLTrain's alpha
# (32 / 16 / 16 / 8 for 60M / 130M / 350M / 1B) and Fira's scale (0.0625 at 1B). The recipes
# carry the 60M values; ``paper_settings`` gives what a run at another size should override.
_SIZE_SETTINGS: dict[str, dict[str, dict[str, float]]] = {
    "130m": {"sltrain": {"alpha": 16.0}},
    "350m": {"sltrain": {"alpha": 16.0}},
    "1b": {"sltrain": {"alpha": 8.0}, "fira": {"scale": 0.0625}, "scale": {"lr_ratio": 0.2}},
    "7b": {"scale": {"lr_ratio": 0.1}},  # adam_mini's head size: the model description (dim / n_heads)
}
# Settings that stay put at every size although the method has a ``rank`` key (the flavor's rank
# would otherwise be applied): APOLLO-Mini is rank 1 by definition.
_ALL_SIZES: dict[str, dict[str, float]] = {"apollo_mini": {"rank": 1}}


def paper_settings(flavor: str, methods: list[str], has_rank) -> dict[str, dict[str, float]]:
    """``{method: {key: value}}`` for ``flavor``: the flavor's rank for every method for which
    ``has_rank(method)`` is true, plus the size-dependent settings above."""
    out: dict[str, dict] = {m: {"rank": SHAPES[flavor].rank} for m in methods if has_rank(m)}
    for method, values in _SIZE_SETTINGS.get(flavor, {}).items():
        if method in methods:
            out.setdefault(method, {}).update(values)
    for method, values in _ALL_SIZES.items():
        if method in methods:
            out.setdefault(method, {}).update(values)
    return out


def ffn_hidden_dim(args: TransformerModelArgs) -> int:
    """The SwiGLU hidden width torchtitan's llama3 FeedForward builds for ``args``."""
    hidden = int(2 * (4 * args.dim) / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    m = args.multiple_of
    return m * ((hidden + m - 1) // m)


def _args(shape: PaperShape, vocab_size: int) -> TransformerModelArgs:
    return TransformerModelArgs(
        dim=shape.dim,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        n_kv_heads=None,  # the papers use plain multi-head attention
        vocab_size=vocab_size,
        multiple_of=shape.multiple_of,
        ffn_dim_multiplier=None,
        rope_theta=10000,
        max_seq_len=256,  # overwritten from training.seq_len by update_from_config
    )


def describe(args: TransformerModelArgs):
    """The ``ModelDescription`` of a model built from ``args`` (what methods read as ``method.model``)."""
    from slimtrain.registry import ModelDescription

    return ModelDescription(
        hidden_size=args.dim, num_heads=args.n_heads, num_layers=args.n_layers, vocab_size=args.vocab_size,
        num_kv_heads=args.n_kv_heads or args.n_heads, source="torchtitan args",
    )


def build_flavors() -> dict[str, TransformerModelArgs]:
    flavors = {name: _args(shape, PAPER_VOCAB) for name, shape in PAPER_SHAPES.items()}
    flavors["tiny"] = _args(TINY, TINY_VOCAB)
    flavors["nano"] = _args(NANO, TINY_VOCAB)
    return flavors


def expected_ffn(name: str) -> int:
    return {**PAPER_SHAPES, "tiny": TINY, "nano": NANO}[name].ffn


def check_flavors(flavors: dict[str, TransformerModelArgs]) -> None:
    """Assert every flavor's FFN width is the paper's (see module docstring)."""
    for name, args in flavors.items():
        got, want = ffn_hidden_dim(args), expected_ffn(name)
        if got != want:
            raise AssertionError(f"flavor {name}: torchtitan would build FFN {got}, paper says {want}")


FLAVORS = build_flavors()
check_flavors(FLAVORS)


def build_model(flavor: str):
    """A dense llama3 ``Transformer`` of ``flavor``, initialized (for benchmarks and studies that
    need the real model outside the trainer, without importing torchtitan themselves)."""
    import torch

    from torchtitan.models.llama3 import Transformer

    if flavor not in FLAVORS:
        raise ValueError(f"flavor = {flavor!r} is unknown; flavors: {', '.join(FLAVORS)}")
    model = Transformer(FLAVORS[flavor])
    with torch.no_grad():
        model.init_weights()
    return model
