"""The trajectory effect of per-layer updates' projected accumulation (CPU, a few minutes).

Per-layer updates with gradient accumulation keep a projected rule's R (r x n) between micro-batches
instead of the gradient (``UpdateRule.accumulation_specs``). Two choices follow, measured here
against the plain accumulated step (no per-layer updates: the full gradient summed, then one step):

* GaLore: a refresh due in the step is computed from the FIRST micro-batch's gradient (the plain step
  refreshes from the sum); between refreshes the step is the plain one up to fp32 summation order;
* APOLLO-Mini / Fira with ``accumulation = "projected"``: the raw gradient APOLLO scales (Fira's
  residual) is the LAST micro-batch's times k, an estimate of the step's.

Each variant trains the same model on the same data (a fixed random first-order Markov chain over
the vocabulary: learnable, unlike uniform tokens) for ``--steps`` steps of ``--micro`` micro-batches
and reports the held-out loss at the end and the largest training-loss gap to the plain run. A
reference row trains at the micro-batch size (one micro-batch a step, the same steps): what keeping
only one micro-batch's information would cost.

    python benchmarks/accumulation_choices.py --flavor nano --steps 60 --micro 4
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from slimtrain.titan_integration.flavors import FLAVORS, build_model

GAP = 10
METHODS = {
    "galore": (["galore"], {"galore": {"rank": 8, "update_proj_gap": GAP}}),
    "apollo_mini": (["apollo_mini"], {"apollo_mini": {"update_proj_gap": GAP}}),
    "fira": (["fira"], {"fira": {"rank": 8, "update_proj_gap": GAP}}),
}


def markov_data(vocab: int, n: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` batches from a random Markov chain: each token has 4 likely successors."""
    gen = torch.Generator().manual_seed(1234)
    succ = torch.randint(0, vocab, (vocab, 4), generator=gen)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, batch, seq_len, dtype=torch.long)
    tok = torch.randint(0, vocab, (n, batch), generator=gen)
    for t in range(seq_len):
        out[:, :, t] = tok
        pick = torch.randint(0, 4, (n, batch), generator=gen)
        tok = succ[tok, pick]
        noise = torch.rand(n, batch, generator=gen) < 0.1
        tok = torch.where(noise, torch.randint(0, vocab, (n, batch), generator=gen), tok)
    return out


def train(flavor, methods, sections, *, per_layer: bool, micro: int, steps: int, data, held_out, lr: float):
    from slimtrain.registry import OptimizerHyper, StepContext, TrainerSettings, compose

    comp = compose([*methods, *(["per_layer_updates"] if per_layer else [])], sections)
    torch.manual_seed(0)
    model = build_model(flavor)
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=lr))
    if per_layer:
        comp.stepper_method.attach_stepper(opt, TrainerSettings(grad_accumulation_steps=micro))
    ce = torch.nn.functional.cross_entropy
    losses = []
    for step in range(steps):
        total = 0.0
        for i in range(micro):
            x = data[step * micro + i]
            loss = ce(model(x).flatten(0, 1), x.roll(-1, 1)[:, :].flatten()) / micro
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        comp.after_step(StepContext(opt.global_step, [model], [opt]))
        losses.append(total)
    with torch.no_grad():
        held = sum(float(ce(model(x).flatten(0, 1), x.roll(-1, 1).flatten())) for x in held_out) / len(held_out)
    return losses, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavor", default="nano")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    vocab = FLAVORS[args.flavor].vocab_size
    data = markov_data(vocab, args.steps * args.micro, args.batch, args.seq_len, seed=1)
    held_out = markov_data(vocab, 8, args.batch, args.seq_len, seed=2)
    print(f"{datetime.date.today()} {platform.machine()} {args.flavor}, {args.steps} steps x {args.micro} "
          f"micro-batches of {args.batch} x {args.seq_len}, refresh every {GAP} steps, lr {args.lr}")
    print("| method | variant | held-out loss | largest train-loss gap to plain | at step |")
    print("|---|---|---|---|---|")
    for name in args.methods.split(","):
        methods, sections = METHODS[name]
        plain, plain_held = train(args.flavor, methods, sections, per_layer=False, micro=args.micro,
                                  steps=args.steps, data=data, held_out=held_out, lr=args.lr)
        print(f"| {name} | plain accumulated | {plain_held:.4f} | - | - |", flush=True)
        variants = [("per-layer, projected", sections)]
        if name != "galore":
            variants = [("per-layer, accumulation = full", sections),
                        ("per-layer, accumulation = projected",
                         {name: {**sections[name], "accumulation": "projected"}})]
        for label, secs in variants:
            losses, held = train(args.flavor, methods, secs, per_layer=True, micro=args.micro,
                                 steps=args.steps, data=data, held_out=held_out, lr=args.lr)
            gaps = [abs(a - b) for a, b in zip(losses, plain)]
            worst = max(range(len(gaps)), key=gaps.__getitem__)
            print(f"| {name} | {label} | {held:.4f} | {gaps[worst]:.4f} | {worst + 1} |", flush=True)
        # the micro-batch size alone: one micro-batch a step (the first of each step's), same steps
        small = data.view(args.steps, args.micro, *data.shape[1:])[:, 0]
        _, held = train(args.flavor, methods, sections, per_layer=False, micro=1, steps=args.steps,
                        data=small, held_out=held_out, lr=args.lr)
        print(f"| {name} | reference: one micro-batch a step | {held:.4f} | | |", flush=True)


if __name__ == "__main__":
    main()
