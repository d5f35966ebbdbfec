"""Equality across the three paths: the same composition on the same weights and gradients gives the
same parameters after 20 steps through the torchtitan trainer's optimizer builder, the plain loop
(``slimtrain.prepare``) and the Hugging Face adapter.

The torchtitan path steps a torchtitan llama3 ``Transformer``, the HF adapter a ``LlamaForCausalLM``;
their parameter names and orders differ (and with them the per-parameter seeds of GaLore's and
APOLLO's projections), so each is compared with the plain loop on a model of its own class, with
the other path's schedule: titan == plain on the titan model, HF adapter == plain on the HF model.
Bitwise: every path runs the same arithmetic (the same composed optimizer and hooks).
"""

from __future__ import annotations

import types

import pytest
import torch

import slimtrain

STEPS = 20
RECIPES = {
    "sltrain+refactorization+momentum_reset": {
        "methods": ["sltrain", "refactorization", "momentum_reset"], "sltrain": {"rank": 4},
        "refactorization": {"every": 5}, "momentum_reset": {"every": 7, "warmup_steps": 3},
    },
    "galore+state_8bit": {"methods": ["galore", "state_8bit"], "galore": {"rank": 4, "update_proj_gap": 6}},
    "sltrain+apollo_mini": {
        "methods": ["sltrain", "apollo_mini"], "sltrain": {"rank": 4},
        "apollo_mini": {"roles": ["B", "A"], "rank": 1, "update_proj_gap": 6, "scale": 16.0},
    },
}
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(STEPS)]


def lm_loss(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def plain_path(model, recipe, schedule):
    prepared = slimtrain.prepare(model, recipe, **HYPER)
    return prepared, prepared.scheduler(schedule)


def run_plain(prepared, scheduler, forward, data):
    for tokens in data:
        lm_loss(forward(prepared.model, tokens), tokens).backward()
        prepared.optimizer.step()
        scheduler.step()
        prepared.optimizer.zero_grad()
        prepared.after_step()


def assert_bitwise(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


# -- torchtitan --------------------------------------------------------------------------------
def titan_model(recipe):
    from slimtrain.titan_integration import context
    from slimtrain.titan_integration.converter import SlimtrainConverter
    from torchtitan.models.llama3 import Transformer

    args = titan_args()
    comp = slimtrain.load_recipe(recipe).compose()
    converter = SlimtrainConverter.__new__(SlimtrainConverter)  # what torchtitan builds from the job config
    converter.composition = comp
    converter.job_config = types.SimpleNamespace(
        model=types.SimpleNamespace(flavor="(test)"),
        training=types.SimpleNamespace(max_norm=0.0, global_batch_size=-1, local_batch_size=4),  # no clipping, no accumulation
    )
    context.reset()
    context._STATE = context.RunState(converter.job_config, comp)
    with torch.device("meta"):
        model = Transformer(args)
    converter.convert(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    return model, comp


@pytest.mark.parametrize("name", list(RECIPES))
def test_titan_builder_equals_plain_loop(name):
    from slimtrain.titan_integration import context, memory_layers, optimizer
    from torchtitan.config.job_config import LRScheduler, Optimizer
    from torchtitan.models.llama3 import Transformer

    recipe, data = RECIPES[name], batches()
    model, comp = titan_model(recipe)
    # the converter described the model to every method before parametrizing (Adam-mini's head size)
    assert comp.model.head_dim == 16 and comp.model.num_layers == 2 and comp.model.vocab_size == 64
    assert all(m.model is comp.model for m in comp.methods)
    opt_cfg = Optimizer(lr=HYPER["lr"], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, implementation="foreach")
    lr_cfg = LRScheduler(warmup_steps=3, decay_type="cosine", min_lr_factor=0.1)
    try:
        container = memory_layers.build_optimizers([model], opt_cfg, parallel_dims=None)
        schedulers = optimizer.build_lr_schedulers(container, lr_cfg, STEPS)
        base_schedule = optimizer.titan_build_lr_schedulers(
            [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)], lr_cfg, STEPS
        ).schedulers[0].lr_lambdas[0]
    finally:
        context.reset()
    plain = Transformer(titan_args())
    prepared, scheduler = plain_path(plain, recipe, base_schedule)
    plain.load_state_dict(model.state_dict())  # the same weights (factors, sparse values, supports)
    initial = model.tok_embeddings.weight.detach().clone()
    assert prepared.description.hidden_size == 64 and prepared.description.vocab_size == 64
    for tokens in data:
        lm_loss(model(tokens), tokens).backward()
        container.step()  # its post-step hook runs the composition's step hooks
        schedulers.step()
        container.zero_grad()
    run_plain(prepared, scheduler, lambda m, t: m(t), data)
    assert not torch.equal(model.tok_embeddings.weight, initial)  # the steps did something
    assert container.optimizers[0].global_step == prepared.optimizer.global_step == STEPS
    assert_bitwise(model, plain)


def titan_args():
    from torchtitan.models.llama3 import TransformerModelArgs

    return TransformerModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32)


# -- Hugging Face ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RECIPES))
def test_hf_adapter_equals_plain_loop(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from slimtrain.hf import SlimtrainTrainer

    recipe, data = RECIPES[name], batches()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, learning_rate=HYPER["lr"], adam_beta1=0.9,
                             adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, warmup_steps=3,
                             lr_scheduler_type="cosine", report_to=[], use_cpu=True)
    trainer = SlimtrainTrainer(model=hf_model, args=args, train_dataset=[{"input_ids": data[0][0]}], recipe=recipe)
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    base_schedule = transformers.get_scheduler(
        "cosine", torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), num_warmup_steps=3, num_training_steps=STEPS
    ).lr_lambdas[0]
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config)
    prepared, scheduler = plain_path(plain, recipe, base_schedule)
    plain.load_state_dict(hf_model.state_dict())
    for tokens in data:
        lm_loss(hf_model(tokens).logits, tokens).backward()
        trainer.optimizer.step()
        trainer.callback_handler.on_optimizer_step(trainer.args, trainer.state, trainer.control)  # as Trainer's loop
        trainer.lr_scheduler.step()
        hf_model.zero_grad()
    run_plain(prepared, scheduler, lambda m, t: m(t).logits, data)
    assert trainer.slimtrain.optimizer.global_step == STEPS
    assert_bitwise(hf_model, plain)
