"""A tiny torchtitan LLaMA with a composition applied the way the trainer applies it:
parametrize on meta, materialize, the model's own init (captured), then the methods' init."""

from __future__ import annotations

import torch

TINY = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)


def tiny_model(comp, seed: int = 0, capture: bool = True):
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    with torch.device("meta"):
        model = Transformer(TransformerModelArgs(**TINY))
    if comp is not None:
        comp.apply_parametrizations(model)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        if comp is not None and capture:
            with comp.capture_init():
                model.init_weights()
        else:
            model.init_weights()
    if comp is not None:
        comp.init_parametrized(model)
    return model
