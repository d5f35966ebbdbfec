"""The GPU memory model (registry/device_memory.py) against the tensors a real training step holds:
weights, gradients (all, or the per-layer peak), optimizer state (8-bit where state_8bit stores it) and
index buffers, measured on a small torchtitan LLaMA in fp32 (bytes_per_element = 4), within 5%.
Activations and the step's peak: tests/methods/test_memory_tracker.py (torch's MemTracker)."""

from __future__ import annotations

import pytest
import torch

DIMS = dict(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=16, max_seq_len=32)
RECIPES = {
    "full_rank": (["adamw"], {}),
    "galore": (["galore"], {"galore": {"rank": 8, "update_proj_gap": 2}}),
    "galore_8bit": (["galore", "state_8bit"], {"galore": {"rank": 8}, "state_8bit": {"block_size": 32}}),
    "galore_per_layer": (["galore", "per_layer_updates"], {"galore": {"rank": 8}}),
    "sltrain_galore_8bit_per_layer": (
        ["sltrain", "galore", "state_8bit", "per_layer_updates"],
        {"sltrain": {"rank": 8, "delta": 0.05}, "galore": {"rank": 4, "roles": ["B", "A"]}},
    ),
}


def _bytes(t: torch.Tensor) -> int:
    from slimtrain.registry.tensors import local_tensor

    t = local_tensor(t)
    return t.numel() * t.element_size()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_model_matches_the_tensors_of_a_real_step(recipe):
    from torchtitan.models.llama3 import Transformer, TransformerModelArgs

    from slimtrain.plugins.per_layer_updates import PerLayerStepper
    from slimtrain.plugins.state_8bit import install_codec
    from slimtrain.registry import OptimizerHyper, compose, llama_dense_specs
    from slimtrain.registry.device_memory import device_memory

    methods, sections = RECIPES[recipe]
    comp = compose(methods, sections)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(TransformerModelArgs(**DIMS))
    ffn = model.layers["0"].feed_forward.w1.weight.shape[0]
    comp.apply_parametrizations(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones(p.shape) if p.ndim == 1 else torch.randn(p.shape) * 0.05)
        model.freqs_cis = model._precompute_freqs_cis()
    comp.init_parametrized(model)
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-3))
    if "state_8bit" in methods:
        install_codec(opt, comp.method("state_8bit").codec())
    grad_peak = 0
    if "per_layer_updates" in methods:
        stepper = PerLayerStepper(opt)
        orig = stepper._hook

        def hook(p):
            nonlocal grad_peak
            live = sum(_bytes(q.grad) for q in model.parameters() if q.grad is not None)
            grad_peak = max(grad_peak, live)
            orig(p)

        for h in stepper.handles:
            h.remove()
        stepper.handles = [p.register_post_accumulate_grad_hook(hook) for g in opt.param_groups for p in g["params"]]
    tokens = torch.randint(0, DIMS["vocab_size"], (2, 16))
    model(tokens).float().logsumexp(-1).mean().backward()
    if "per_layer_updates" not in methods:
        grad_peak = sum(_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt.step()
    measured = dict(
        weights=sum(_bytes(p) for p in model.parameters()),
        gradients=grad_peak,
        optimizer=sum(_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()),
        index=sum(_bytes(b) for n, b in model.named_buffers() if n.endswith("index")),
    )
    dense = llama_dense_specs(DIMS["dim"], ffn, DIMS["n_layers"], DIMS["vocab_size"], DIMS["n_heads"])
    est = device_memory(comp, dense, dim=DIMS["dim"], ffn=ffn, layers=DIMS["n_layers"], heads=DIMS["n_heads"],
                        vocab=DIMS["vocab_size"], batch=2, seq_len=16, bytes_per_element=4)
    for key, value in measured.items():
        want = getattr(est, key)
        assert abs(value - want) <= 0.05 * max(want, 1), (key, value, want)
    if "state_8bit" in methods:
        assert est.optimizer < device_memory(compose([m for m in methods if m != "state_8bit"], sections), dense,
                                             dim=64, ffn=ffn, layers=2, heads=4, vocab=256, batch=2, seq_len=16,
                                             bytes_per_element=4).optimizer
    if "per_layer_updates" in methods:
        assert 0 < measured["gradients"] < 0.5 * est.weights


def test_the_analytic_table_counts_8bit_state_as_the_device_table_does():
    """`slimtrain memory` (weights + state) and `--device` give one optimizer figure for a composition
    with state_8bit: 1 byte per moment element plus the block scales, not 2."""
    from slimtrain.registry import compose, llama_dense_specs
    from slimtrain.registry.device_memory import device_memory

    dense = llama_dense_specs(64, 160, 2, 256, 4)
    plain = compose(["galore"], {"galore": {"rank": 8}}).estimate_memory(dense)
    comp = compose(["galore", "state_8bit"], {"galore": {"rank": 8}, "state_8bit": {"block_size": 32}})
    est = comp.estimate_memory(dense)
    dev = device_memory(comp, dense, dim=64, ffn=160, layers=2, heads=4, vocab=256, batch=1, seq_len=8, ac="full")
    assert est.optimizer_bytes == dev.optimizer
    assert plain.optimizer_bytes * 0.5 < est.optimizer_bytes < plain.optimizer_bytes * 0.75
