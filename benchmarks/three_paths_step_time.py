"""Optimizer-step cost of the three paths on the same parameters: torchtitan's optimizer builder,
``slimtrain.prepare`` (plain loop) and the Hugging Face adapter (its optimizer as the Trainer's
accelerate wrapper steps it, its scheduler and its step-hook callback).

Timed per step: optimizer step + LR-scheduler step + step hooks (the work between backward and the
next forward), on fixed gradients, as process CPU time (run with OMP_NUM_THREADS=1: on a shared
machine wall time measures the neighbours); the paths alternate round by round; medians. Writes a markdown table (``--out``), e.g. docs/benchmarks/three_paths_step_time.md.

    .venv/bin/python benchmarks/three_paths_step_time.py --dim 256 --layers 4 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types

import torch

import slimtrain

RECIPES = {
    "sltrain+refactorization+momentum_reset": {
        "methods": ["sltrain", "refactorization", "momentum_reset"], "sltrain": {"rank": 32},
        "refactorization": {"every": 10}, "momentum_reset": {"every": 10, "warmup_steps": 3}},
    "galore+state_8bit": {"methods": ["galore", "state_8bit"], "galore": {"rank": 32, "update_proj_gap": 50}},
}


def titan_path(recipe, dim, layers, vocab):
    from slimtrain.titan_integration import context, memory_layers, optimizer
    from slimtrain.titan_integration.converter import SlimtrainConverter
    from slimtrain.titan_integration.titan_types import LRScheduler, Optimizer
    from slimtrain.titan_integration.titan_types import Transformer, TransformerModelArgs

    args = TransformerModelArgs(dim=dim, n_layers=layers, n_heads=4, vocab_size=vocab, multiple_of=16, max_seq_len=64)
    comp = slimtrain.load_recipe(recipe).compose()
    conv = SlimtrainConverter.__new__(SlimtrainConverter)
    conv.composition, conv.job_config = comp, types.SimpleNamespace(
        model=types.SimpleNamespace(flavor="(bench)"),
        training=types.SimpleNamespace(max_norm=0.0, global_batch_size=-1, local_batch_size=4))
    context.reset()
    context._STATE = context.RunState(conv.job_config, comp)
    with torch.device("meta"):
        model = Transformer(args)
    conv.convert(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    container = memory_layers.build_optimizers(
        [model], Optimizer(lr=1e-3, weight_decay=0.0, implementation="foreach"), parallel_dims=None)
    scheds = optimizer.build_lr_schedulers(container, LRScheduler(warmup_steps=3), 10_000)
    context.reset()

    def step():
        container.step()
        scheds.step()

    return model, step


def plain_path(recipe, model):
    p = slimtrain.prepare(model, recipe, lr=1e-3, weight_decay=0.0)
    sched = p.scheduler()

    def step():
        p.optimizer.step()
        sched.step()
        p.after_step()

    return model, step


def hf_path(recipe, dim, layers, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from slimtrain.hf import SlimtrainTrainer

    model = LlamaForCausalLM(LlamaConfig(hidden_size=dim, intermediate_size=int(8 * dim / 3) // 16 * 16, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=64))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=10_000, learning_rate=1e-3, weight_decay=0.0,
                             report_to=[], use_cpu=True)
    trainer = SlimtrainTrainer(model=model, args=args, train_dataset=[{"input_ids": torch.zeros(4, dtype=torch.long)}], recipe=recipe)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    wrapped = trainer.accelerator.prepare_optimizer(trainer.optimizer)  # what the Trainer's loop steps

    def step():
        wrapped.step()
        trainer.callback_handler.on_optimizer_step(trainer.args, trainer.state, trainer.control)
        trainer.lr_scheduler.step()

    return model, step


def fixed_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters() if p.requires_grad}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    lines = [f"| recipe | torchtitan builder (CPU ms) | plain loop (CPU ms) | HF adapter (CPU ms) | plain / titan | HF / titan |", "|---|---|---|---|---|---|"]
    for name, recipe in RECIPES.items():
        titan_model, titan_step = titan_path(recipe, a.dim, a.layers, a.vocab)
        from slimtrain.titan_integration.titan_types import Transformer

        plain_model = Transformer(_args(a))
        plain_model.load_state_dict({k: v for k, v in titan_model.state_dict().items() if "parametrizations" not in k}, strict=False)
        _, plain_step = plain_path(recipe, plain_model)
        hf_model, hf_step = hf_path(recipe, a.dim, a.layers, a.vocab)
        paths = {"titan": (titan_model, titan_step), "plain": (plain_model, plain_step), "hf": (hf_model, hf_step)}
        grads = {k: fixed_grads(m) for k, (m, _) in paths.items()}
        times = {k: [] for k in paths}
        for r in range(a.rounds + 3):
            for k, (m, step) in paths.items():
                for p, g in grads[k].items():
                    p.grad = g.clone()
                t0 = time.process_time()
                step()
                dt = time.process_time() - t0
                if r >= 3:  # warm-up rounds left out
                    times[k].append(dt)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        lines.append(f"| {name} | {med['titan']:.2f} | {med['plain']:.2f} | {med['hf']:.2f} | "
                     f"{med['plain'] / med['titan']:.3f} | {med['hf'] / med['titan']:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return text


def _args(a):
    from slimtrain.titan_integration.titan_types import TransformerModelArgs

    return TransformerModelArgs(dim=a.dim, n_layers=a.layers, n_heads=4, vocab_size=a.vocab, multiple_of=16, max_seq_len=64)


if __name__ == "__main__":
    main()
