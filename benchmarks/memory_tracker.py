"""The GPU memory model (registry/device_memory.py) against torch's MemTracker on CPU.

One training step (forward, loss, backward, optimizer step; with ``per_layer_updates`` the updates
happen in backward) of the flavor's torchtitan LLaMA in fp32 (``bytes_per_element = act_bytes = 4``)
on ``batch x seq_len`` random tokens, measured by ``torch.distributed._tools.mem_tracker.MemTracker``
(a dispatch mode that sees every tensor storage created and freed and files it as parameter,
buffer, gradient, activation, temporary or optimizer state). The step measured is the SECOND one:
the first creates the optimizer state, as in training.

What is compared with the model, category by category:
* weights: parameter storage; index: the buffers whose name ends in ``index`` (SLTrain's support);
* optimizer: optimizer-state storage after the step (what persists between steps);
* gradients: the most gradient storage alive at once during the step; with per-layer updates and
  accumulation, plus the bytes of the rules' accumulation buffers held between micro-batches (the
  tensors in ``ComposedOptimizer._buffers``; MemTracker files them as temporaries);
* activations: what is alive at the end of the forward and loss (what backward keeps), less the
  weights, buffers and state alive before the step;
* peak: the most storage alive at once (every category), against ``DeviceMemory.peak``.

``python benchmarks/memory_tracker.py --flavor tiny,60m`` writes
docs/benchmarks/memory_model_vs_memtracker.md (``--out -`` prints it).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CATEGORIES = ("weights", "gradients", "optimizer", "index", "activations", "peak")


def recipes(rank: int) -> dict[str, tuple[list[str], dict]]:
    """The issue's compositions at ``rank`` (SLTrain at half of it: its factors and sparse part)."""
    return {
        "full_rank": (["adamw"], {}),
        "galore": (["galore"], {"galore": {"rank": rank}}),
        "galore + state_8bit": (["galore", "state_8bit"], {"galore": {"rank": rank}}),
        "galore + per_layer_updates": (["galore", "per_layer_updates"], {"galore": {"rank": rank}}),
        "sltrain + apollo_mini + state_8bit + per_layer_updates": (
            ["sltrain", "apollo_mini", "state_8bit", "per_layer_updates"],
            {"sltrain": {"rank": rank // 2, "delta": 0.01}, "apollo_mini": {"roles": ["B", "A"], "rank": 1}},
        ),
        # per-layer updates with gradient accumulation (MICRO_BATCHES): GaLore's r x n buffers, AdamW's
        # full gradients; the 7B recipe's composition with APOLLO-Mini's projected accumulation
        "galore + per_layer_updates (3 micro-batches)": (["galore", "per_layer_updates"], {"galore": {"rank": rank}}),
        "sltrain + apollo_mini (projected) + state_8bit + per_layer_updates (3 micro-batches)": (
            ["sltrain", "apollo_mini", "state_8bit", "per_layer_updates"],
            {"sltrain": {"rank": rank // 2, "delta": 0.01},
             "apollo_mini": {"roles": ["B", "A"], "rank": 1, "accumulation": "projected"}},
        ),
        # the example memory layer (examples/slimtrain-bf16-memory-layer: bf16 moments)
        "galore + bf16_state (example)": (["galore", EXAMPLE_LAYER], {"galore": {"rank": rank}}),
    }


#: micro-batches per step of a recipe (1 when not named)
MICRO_BATCHES = {
    "galore + per_layer_updates (3 micro-batches)": 3,
    "sltrain + apollo_mini (projected) + state_8bit + per_layer_updates (3 micro-batches)": 3,
}
EXAMPLE_LAYER = "bf16_state"


def register_example_layer() -> None:
    """Register the example distribution's memory layer from its folder (it need not be installed)."""
    from slimtrain.registry import manager

    if EXAMPLE_LAYER in manager.get_methods():
        return
    folder = str(ROOT / "examples" / "slimtrain-bf16-memory-layer")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    from slimtrain_bf16_state import bf16_state

    manager.register_plugin(bf16_state, name="example-bf16-state")


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class CategoryMaxTracker(MemTracker):
        """MemTracker that also keeps the most bytes each category held at once."""

        def __init__(self) -> None:
            super().__init__()
            self.category_max: dict[str, int] = {}

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            for snap in self._curr_mem_snap.values():
                for key, value in snap.items():
                    name = getattr(key, "name", str(key))
                    if value > self.category_max.get(name, 0):
                        self.category_max[name] = value

    return CategoryMaxTracker


def _peak_bw():
    from torch.distributed._tools.mem_tracker import _ModState

    return _ModState.PEAK_BW


def _total_key():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    return _TOTAL_KEY


def _snap(tracker, kind: str = "current") -> dict[str, int]:
    out = tracker.get_tracker_snapshot(kind).get(torch.device("cpu"), {})
    return {getattr(k, "name", str(k)): int(v) for k, v in out.items()}


def build(flavor: str, methods: list[str], sections: dict, ac: str = "none", micro: int = 1):
    """The flavor's model with the composition applied, its composed optimizer and memory layers."""
    from slimtrain.registry import OptimizerHyper, TrainerSettings, compose
    from slimtrain.titan_integration.activation_checkpointing import apply_activation_checkpointing
    from slimtrain.titan_integration.flavors import build_model

    comp = compose(methods, sections)
    torch.manual_seed(0)
    model = build_model(flavor)
    comp.apply_parametrizations(model)
    comp.init_parametrized(model)
    apply_activation_checkpointing(model, ac)
    opt = comp.build_optimizer(comp.param_groups(model), OptimizerHyper(lr=1e-3))
    if comp.codec_method is not None:  # the memory layers, as the trainer installs them
        opt.install_codec(comp.state_codec())
    settings = TrainerSettings(grad_accumulation_steps=micro)
    stepper = comp.stepper_method.attach_stepper(opt, settings) if comp.stepper_method else None
    return comp, model, opt, stepper


def measure(
    flavor: str, methods: list[str], sections: dict, *, batch: int, seq_len: int, ac: str = "none", micro: int = 1,
) -> dict:
    """MemTracker's figures (bytes) for the second training step (see the module docstring); with
    ``micro`` > 1, that many micro-batches of ``batch`` (the same tokens) before the step, the
    activations read at the first micro-batch's loss."""
    comp, model, opt, _stepper = build(flavor, methods, sections, ac, micro)
    vocab = model.tok_embeddings.weight.shape[0] if hasattr(model.tok_embeddings, "weight") else None
    gen = torch.Generator().manual_seed(1)
    vocab = vocab or model.output.weight.shape[0]
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    marks: dict[str, dict[str, int]] = {}

    blocks: dict[int, int] = {}

    def step(tracker=None) -> None:
        for i in range(micro):
            pred = model(tokens)
            loss = torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1)) / micro
            del pred
            if tracker is not None and i == 0:
                marks["forward"] = _snap(tracker)
            loss.backward()
            del loss
            if tracker is not None and micro > 1:  # MemTracker tracks one forward per module: keep
                block_peaks(tracker, blocks)         # this micro-batch's block peaks, then start over
                tracker.reset_mod_stats()
                held = getattr(opt, "_buffers", {})  # a rule's accumulation buffers (MemTracker files
                marks["buffers"] = max(marks.get("buffers", 0), sum(  # them as temporaries, not GRAD)
                    t.numel() * t.element_size() for bufs in held.values() for t in bufs.values()))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    tracker = _tracker_class()()
    tracker.track_external(model, opt, tokens, labels)
    t0 = time.perf_counter()
    with tracker:
        before = _snap(tracker)
        step(tracker)
    seconds = time.perf_counter() - t0
    after = _snap(tracker)
    peak = _snap(tracker, "peak")
    block_peaks(tracker, blocks)
    index = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("index"))
    static_before = sum(before.get(k, 0) for k in ("PARAM", "BUFFER", "OPT", "OTH"))
    return dict(
        weights=before.get("PARAM", 0),
        gradients=tracker.category_max.get("GRAD", 0) + marks.get("buffers", 0),
        optimizer=after.get("OPT", 0),
        index=index,
        activations=marks["forward"]["Total"] - static_before,
        peak=peak.get("Total", 0),
        peak_breakdown=peak,
        block_peaks=blocks,  # the most alive during each block's backward (its recompute included)
        seconds=seconds,
    )


def block_peaks(tracker, blocks: dict[int, int]) -> None:
    """The most bytes alive during each block's backward so far, into ``blocks`` (max with it)."""
    for stats in tracker.memory_tracking.values():
        parts = stats.mod_fqn.split(".")
        if len(parts) == 3 and parts[1] == "layers":
            snaps = stats.snapshots.get(_peak_bw(), [])
            totals = [int(v.get(_total_key(), 0)) for snap in snaps for v in snap.values()]
            if totals:
                blocks[int(parts[2])] = max(blocks.get(int(parts[2]), 0), max(totals))


def model_figures(
    flavor: str, methods: list[str], sections: dict, *, batch: int, seq_len: int, ac: str = "none", micro: int = 1,
):
    """``slimtrain.registry.device_memory.device_memory`` for the same composition, fp32 on CPU."""
    from slimtrain.registry import compose, llama_dense_specs
    from slimtrain.registry.device_memory import device_memory
    from slimtrain.titan_integration.flavors import FLAVORS, SHAPES

    shape, vocab = SHAPES[flavor], FLAVORS[flavor].vocab_size
    comp = compose(methods, sections)
    return device_memory(
        comp, llama_dense_specs(shape.dim, shape.ffn, shape.n_layers, vocab, shape.n_heads),
        dim=shape.dim, ffn=shape.ffn, layers=shape.n_layers, heads=shape.n_heads, vocab=vocab,
        batch=batch, seq_len=seq_len, ac=ac, bytes_per_element=4, act_bytes=4, device="cpu",
        grad_accumulation_steps=micro,
    )


def compare(flavor: str, name: str, *, batch: int, seq_len: int, ac: str) -> dict:
    from slimtrain.titan_integration.flavors import SHAPES

    methods, sections = recipes(SHAPES[flavor].rank)[name]
    if EXAMPLE_LAYER in methods:
        register_example_layer()
    micro = MICRO_BATCHES.get(name, 1)
    got = measure(flavor, methods, sections, batch=batch, seq_len=seq_len, ac=ac, micro=micro)
    est = model_figures(flavor, methods, sections, batch=batch, seq_len=seq_len, ac=ac, micro=micro)
    want = {k: getattr(est, k) for k in CATEGORIES}
    static = est.weights + est.index + est.optimizer
    blocks = {i: (static + est.phases[f"block {i}"], got["block_peaks"][i]) for i in sorted(got["block_peaks"])}
    return dict(flavor=flavor, recipe=name, ac=ac, batch=batch, seq_len=seq_len, measured=got, model=want,
                model_peak_phase=est.peak_phase, blocks=blocks)


def error(measured: int, model: int) -> float:
    """Relative error of the model against the measurement (0 when both are 0)."""
    if measured == 0 and model == 0:
        return 0.0
    return (model - measured) / max(measured, 1)


def format_rows(rows: list[dict], extra: bool = False) -> str:
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    tail = " peak at | blocks |" if extra else ""
    out = [
        "| flavor | recipe | AC | batch x seq | " + " | ".join(CATEGORIES) + " |" + tail,
        "|---|---|---|---|" + "---|" * len(CATEGORIES) + ("---|---|" if extra else ""),
    ]
    for r in rows:
        cells = [
            f"{mb(r['model'][c])} / {mb(r['measured'][c])} ({100 * error(r['measured'][c], r['model'][c]):+.1f}%)"
            for c in CATEGORIES
        ]
        line = f"| {r['flavor']} | {r['recipe']} | {r['ac']} | {r['batch']} x {r['seq_len']} | " + " | ".join(cells) + " |"
        if extra:
            blocks = max((abs(error(g, m)) for m, g in r["blocks"].values()), default=0.0)
            line += f" {r['model_peak_phase']} | {100 * blocks:.1f}% |"
        out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--ac", default="none,selective,full")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--recipes", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--json", default=str(ROOT / "docs/benchmarks/memory_model_vs_memtracker.json"),
                    help="rows are merged into this file (same flavor, recipe, AC, batch and length replaced)")
    ap.add_argument("--out", default=str(ROOT / "docs/benchmarks/memory_model_vs_memtracker.md"),
                    help="markdown rendered from every row of --json, or - to print this run's rows only")
    ap.add_argument("--render-only", action="store_true", help="re-render --out from --json, measure nothing")
    args = ap.parse_args(argv)
    if args.render_only:
        import json

        write_doc(Path(args.out), json.loads(Path(args.json).read_text()))
        return 0
    names = args.recipes.split(",") if args.recipes else list(recipes(8))
    rows = []
    for flavor in args.flavor.split(","):
        for ac in args.ac.split(","):
            for name in names:
                r = compare(flavor, name, batch=args.batch, seq_len=args.seq_len, ac=ac)
                r["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                r["device"] = device_line()
                rows.append(r)
                print(format_rows([r]).splitlines()[-1], f"({r['measured']['seconds']:.1f} s tracked)", flush=True)
    if args.out == "-":
        print(format_rows(rows))
        return 0
    write_doc(Path(args.out), merge_rows(Path(args.json), rows))
    print(f"wrote {args.json} and {args.out}")
    return 0


def write_doc(out: Path, rows: list[dict]) -> None:
    """The tables after ``MARKER``; the hand-written text above it is kept."""
    text = out.read_text() if out.exists() else ""
    notes = text.split(MARKER)[0] if MARKER in text else ""
    out.write_text(notes + MARKER + "\n\n" + render_doc(rows))


def device_line() -> str:
    import os

    return f"CPU {platform.machine()} ({os.cpu_count()} cores, shared), torch {torch.__version__}"


def _key(r: dict) -> tuple:
    return (r["flavor"], r["recipe"], r["ac"], r["batch"], r["seq_len"])


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    import json

    saved = json.loads(path.read_text()) if path.exists() else []
    new = {_key(r): _jsonable(r) for r in rows}
    merged = [r for r in saved if tuple(r["key"]) not in new] + list(new.values())
    order = {"tiny": 0, "nano": -1}
    merged.sort(key=lambda r: (order.get(r["flavor"], 1), r["flavor"], r["batch"] * r["seq_len"], AC_ORDER.index(r["ac"]),
                               list(recipes(8)).index(r["recipe"])))
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


AC_ORDER = ("none", "selective", "full")
#: the rendered tables follow this line; what is above it in the markdown file is kept as written
MARKER = "<!-- tables below: generated by benchmarks/memory_tracker.py from memory_model_vs_memtracker.json -->"


def _jsonable(r: dict) -> dict:
    measured = {k: v for k, v in r["measured"].items() if k in CATEGORIES}
    return dict(key=list(_key(r)), flavor=r["flavor"], recipe=r["recipe"], ac=r["ac"], batch=r["batch"],
                seq_len=r["seq_len"], model=r["model"], measured=measured, model_peak_phase=r["model_peak_phase"],
                blocks={str(i): list(v) for i, v in r["blocks"].items()}, date=r["date"], device=r["device"])


def render_doc(rows: list[dict]) -> str:
    worst = max(abs(error(r["measured"][c], r["model"][c])) for r in rows for c in CATEGORIES)
    worst_block = max((abs(error(g, m)) for r in rows for m, g in r["blocks"].values()), default=0.0)
    lines = [
        "## Measurements",
        "",
        "`registry/device_memory.py` (``device=\"cpu\"``, fp32: 4 bytes per weight, gradient, state and",
        "activation element) against `torch.distributed._tools.mem_tracker.MemTracker` on the second training",
        "step (forward, fp32 cross-entropy, backward, optimizer step; per-layer updates step in backward) of the",
        "flavor's torchtitan LLaMA, random tokens. Produced by `benchmarks/memory_tracker.py` (rows merged into",
        "`memory_model_vs_memtracker.json`, this file rendered from it). Each cell: model / measured MiB",
        "(model error). `peak at`: the moment the model puts the peak at (`registry/device_memory.py`'s",
        "docstring). `blocks`: the largest error over the blocks of the model's `block i` moment against",
        "MemTracker's peak during that block's backward (its recompute included).",
        "",
        f"Largest error, categories and peak: {100 * worst:.1f}%; block moments: {100 * worst_block:.1f}%.",
        "",
    ]
    for (flavor, batch, seq_len), group in _groups(rows):
        first = group[0]
        lines += [f"## {flavor}, batch {batch} x {seq_len} ({first['date']}, {first['device']})", ""]
        lines.append(format_rows(group, extra=True))
        lines.append("")
    return "\n".join(lines)


def _groups(rows: list[dict]):
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["flavor"], r["batch"], r["seq_len"]), []).append(r)
    return list(out.items())


if __name__ == "__main__":
    raise SystemExit(main())
