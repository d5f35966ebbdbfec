"""A plain PyTorch loop training a model of its own with a slimtrain composition (SLTrain + refactorization + momentum reset)."""
import argparse

import torch
from torch import nn

import slimtrain


class TinyLM(nn.Module):  # neither torchtitan's nor transformers': any nn.Module with nn.Linear layers
    def __init__(self, vocab=64, dim=64, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(dim, 4 * dim), "down": nn.Linear(4 * dim, dim)}) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = x + b["down"](torch.relu(b["up"](x)))
        return self.head(x)


def main(argv=None):
    args = argparse.ArgumentParser()
    args.add_argument("--steps", type=int, default=60)
    args = args.parse_args(argv)
    torch.manual_seed(0)
    model = TinyLM()
    recipe = {"methods": ["sltrain", "refactorization", "momentum_reset"], "sltrain": {"rank": 8, "targets": ["up", "down"]},
              "refactorization": {"every": 20}, "momentum_reset": {"every": 30, "warmup_steps": 5}}
    prepared = slimtrain.prepare(model, recipe, lr=1e-2, weight_decay=0.0)
    scheduler = prepared.scheduler(lambda k: min(1.0, (k + 1) / 10))  # warmup x the methods' LR factor
    for step in range(1, args.steps + 1):
        tokens = torch.randint(0, 64, (16, 32))
        targets = (tokens * 5 + 3) % 64  # a rule to learn: each token fixes the next
        loss = nn.functional.cross_entropy(model(tokens).reshape(-1, 64), targets.reshape(-1))
        loss.backward()
        prepared.optimizer.step()
        scheduler.step()
        prepared.optimizer.zero_grad()
        prepared.after_step()  # refactorization every 20 steps, momentum reset every 30
        if step == 1 or step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
