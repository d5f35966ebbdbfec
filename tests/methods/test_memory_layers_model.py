"""The memory models read memory layers through the contract and the routing plan: accumulation
buffers are counted, the routing plan is built once per composition and its rules carry the
trainer's ``implementation`` (so the device model reaches AdamW's fused / for-loop workspace)."""

from __future__ import annotations

from slimtrain.registry import compose, llama_dense_specs
from slimtrain.registry.device_memory import device_memory, gradient_bytes
from slimtrain.registry.memory import transformed_specs

DENSE = llama_dense_specs(64, 160, 2, 256, 4)
SHAPE = dict(dim=64, ffn=160, layers=2, heads=4, vocab=256, batch=2, seq_len=16)


def test_accumulation_buffers_are_every_gradient_with_or_without_per_layer_updates():
    per_layer = compose(["adamw", "per_layer_updates"], {})
    specs, _ = transformed_specs(per_layer, DENSE)
    largest, total = max(s.numel for s in specs) * 2, sum(s.numel for s in specs) * 2
    assert gradient_bytes(per_layer, specs) == largest
    # accumulating: every gradient kept, plus the arriving micro-batch gradient of the largest
    assert gradient_bytes(per_layer, specs, grad_accumulation_steps=2) == total + largest
    assert gradient_bytes(compose(["adamw"], {}), specs) == total
    one = device_memory(per_layer, DENSE, **SHAPE)
    two = device_memory(per_layer, DENSE, **SHAPE, grad_accumulation_steps=2)
    assert two.gradients == total + largest and two.peak - one.peak >= total - 2 * largest


def test_the_routing_plan_is_built_once_and_its_rules_carry_the_implementation():
    comp = compose(["galore"], {"galore": {"rank": 4}})
    specs, _ = transformed_specs(comp, DENSE)
    plan = comp.routing(specs)
    assert comp.routing(specs) is plan
    assert plan.rules is comp.rules and {plan.owners[s.name] for s in plan.specs} == {"galore", "adamw"}
    foreach = device_memory(comp, DENSE, **SHAPE)
    comp.implementation = "fused"
    assert plan.rules["adamw"].implementation == "fused"
    fused = device_memory(comp, DENSE, **SHAPE)
    assert fused.phases["step"] < foreach.phases["step"]  # AdamW's fused kernels hold no temporary


def test_projected_rules_count_their_r_x_n_buffers_and_others_the_full_gradient():
    """Per-layer updates with accumulation: GaLore's parameters cost their fp32 r x n buffer, AdamW's
    their gradient, plus one arriving micro-batch gradient (the largest parameter's); without per-layer updates, every
    gradient; APOLLO-Mini only with accumulation = "projected"."""
    from slimtrain.registry.projected_moments import projected_accumulation_specs

    sections = {"galore": {"rank": 4}}
    per_layer = compose(["galore", "per_layer_updates"], sections)
    specs, _ = transformed_specs(per_layer, DENSE)
    plan = per_layer.routing(specs)
    projected = [s for s in plan.specs if plan.owners[s.name] == "galore"]
    full = [s for s in plan.specs if plan.owners[s.name] != "galore"]
    assert projected and full
    buffers = sum(d.numel * 4 for s in projected for d in projected_accumulation_specs(s.shape, 4))
    want = sum(s.numel for s in full) * 2 + buffers + max(s.numel for s in specs) * 2
    assert gradient_bytes(per_layer, specs, grad_accumulation_steps=4) == want
    assert gradient_bytes(compose(["galore"], sections), specs, grad_accumulation_steps=4) == sum(s.numel for s in specs) * 2
    two = device_memory(per_layer, DENSE, **SHAPE, grad_accumulation_steps=2)
    assert two.gradients == want
    # the peak carries the buffers, not the projected parameters' gradients
    plain = device_memory(compose(["galore", "per_layer_updates"], sections), DENSE, **SHAPE)
    assert two.peak - plain.peak <= want
    for accumulation, more in (("full", True), ("projected", False)):
        comp = compose(["apollo_mini", "per_layer_updates"], {"apollo_mini": {"accumulation": accumulation}})
        got = gradient_bytes(comp, transformed_specs(comp, DENSE)[0], grad_accumulation_steps=2)
        assert (got == (sum(s.numel for s in specs) + max(s.numel for s in specs)) * 2) is more
