"""Train a tiny transformers LlamaForCausalLM (built from a config, nothing downloaded) with the
Hugging Face Trainer and a slimtrain recipe: SLTrain + refactorization + momentum reset."""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from slimtrain.hf import SlimtrainTrainer

VOCAB = 64


class RuleData(torch.utils.data.Dataset):
    """Sequences where each token fixes the next (t -> 5 t + 3 mod 64): a rule the loss can learn."""

    def __init__(self, n=512, seq=32):
        g = torch.Generator().manual_seed(0)
        x = torch.empty(n, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for i in range(1, seq):
            x[:, i] = (x[:, i - 1] * 5 + 3) % VOCAB
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="outputs/hf_trainer")
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             learning_rate=1e-2, warmup_steps=5, logging_steps=10, save_steps=30, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True)
    recipe = {"methods": ["sltrain", "refactorization", "momentum_reset"], "sltrain": {"rank": 8},
              "refactorization": {"every": 20}, "momentum_reset": {"every": 30, "warmup_steps": 5}}
    trainer = SlimtrainTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=RuleData(), recipe=recipe)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print("losses", " ".join(f"{x:.4f}" for x in losses), flush=True)
    return trainer


if __name__ == "__main__":
    main()
