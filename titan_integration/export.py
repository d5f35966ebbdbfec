"""``slimtrain export RUN_DIR OUT_DIR``: a run's newest checkpoint as a dense Hugging Face Llama.

Why: a run's checkpoint holds factors, sparse values and their index buffers in DCP format, which
no other tool reads. Export rebuilds the run's parametrized torchtitan model from
``RUN_DIR/slimtrain_run.json`` (written by the converter), loads the newest ``step-N`` checkpoint,
bakes every parametrized weight into its dense W, renames torchtitan's keys to transformers'
``LlamaForCausalLM`` ones (q and k rows permuted from torchtitan's interleaved RoPE pairs to HF's
half-split ones) and writes ``model.safetensors``, ``config.json`` and the run's tokenizer files.

Every check that needs no tensor runs first (no run record, a non-Llama model, no checkpoint,
an output folder that exists, no tokenizer); the files are written to a temporary folder next to
OUT_DIR, the exported model's logits are compared with the slimtrain model's (fp32, 1e-4
relative) and only then is the folder renamed to OUT_DIR: nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

from slimtrain.registry import ConfigError

LLAMA_MODEL = "slimtrain_llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LOGIT_RTOL = 1e-4


class ExportError(ConfigError):
    """What is wrong with the run or the output folder (nothing was written)."""


@dataclasses.dataclass
class ExportPlan:
    run_dir: Path
    out_dir: Path
    record: dict
    checkpoint: Path
    step: int
    master_weights: dict | None = None  # what load_run_model restored (restore_master_weights)


def newest_checkpoint(folder: Path) -> tuple[Path, int] | None:
    steps = []
    if folder.is_dir():
        for child in folder.iterdir():
            m = re.fullmatch(r"step-(\d+)", child.name)
            if m and (child / ".metadata").is_file():
                steps.append((int(m.group(1)), child))
    if not steps:
        return None
    step, path = max(steps)
    return path, step


def plan(run_dir: str, out_dir: str) -> ExportPlan:
    """Every check before any work; raises ExportError naming what is wrong."""
    from slimtrain.titan_integration import run_record

    run, out = Path(run_dir), Path(out_dir)
    if out.exists():
        raise ExportError(f"output folder {out} exists: give a new folder (export never overwrites)")
    if not (run / run_record.RECORD).is_file():
        raise ExportError(
            f"{run} is not a slimtrain run folder: no {run_record.RECORD} (the run's --job.dump_folder; "
            f"runs write it when they start)"
        )
    record = run_record.read(str(run))
    if record.get("model_name") != LLAMA_MODEL or not record.get("model_args"):
        raise ExportError(
            f"{run}: model {record.get('model_name')!r} flavor {record.get('flavor')!r} is not a slimtrain Llama "
            f"flavor; export writes LlamaForCausalLM checkpoints only (model name {LLAMA_MODEL!r})"
        )
    found = newest_checkpoint(Path(record["checkpoint_folder"]))
    if found is None:
        raise ExportError(
            f"{run}: the run never checkpointed (no step-N folder with a .metadata file in "
            f"{record['checkpoint_folder']}); train with [checkpoint] enable = true"
        )
    assets = Path(record.get("hf_assets_path") or "")
    if not (assets / "tokenizer.json").is_file():
        raise ExportError(f"{run}: the run's tokenizer {assets / 'tokenizer.json'} is missing")
    return ExportPlan(run, out, record, found[0], found[1])


def model_args(record: dict):
    """The run's torchtitan ``TransformerModelArgs`` (its flavor at the recorded sequence length)."""
    from slimtrain.titan_integration.flavors import FLAVORS

    flavor, saved = record["flavor"], record["model_args"]
    if flavor not in FLAVORS:
        raise ExportError(f"flavor {flavor!r} of the run is unknown here; flavors: {', '.join(FLAVORS)}")
    args = dataclasses.replace(FLAVORS[flavor], max_seq_len=int(saved["max_seq_len"]))
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "rope_theta"):
        if saved.get(key) != getattr(args, key):
            raise ExportError(f"flavor {flavor!r}: the run had {key} = {saved.get(key)!r}, this version builds {getattr(args, key)!r}")
    return args


def load_run_model(p: ExportPlan):
    """The run's parametrized torchtitan model with the checkpoint's weights (fp32, CPU)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from slimtrain.api import parametrize_model
    from slimtrain.registry import compose
    from slimtrain.titan_integration import safe_checkpoint
    from slimtrain.titan_integration.flavors import describe
    from torchtitan.models.llama3 import Transformer

    args = model_args(p.record)
    comp = compose(p.record["methods"], p.record["sections"])
    with torch.device("meta"):
        model = Transformer(args)
    parametrize_model(model, comp, describe(args))
    model.to_empty(device="cpu")
    with torch.no_grad():
        with comp.capture_init():
            model.init_weights()  # also the RoPE table, which no checkpoint holds
        comp.init_parametrized(model)
    safe_checkpoint.install()
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(p.checkpoint))
    model.load_state_dict(state)
    p.master_weights = restore_master_weights(model, comp, p.checkpoint)
    return model.eval(), args


def restore_master_weights(model, comp, checkpoint: Path) -> dict | None:
    """A run whose memory layer keeps the weights as a stored dtype plus state of its own (e.g.
    ``master_weights_bf16``: bf16 plus an int8 correction in the optimizer state) exports the weight
    that layer restores, not the stored one: each trainable parameter's layer state is read from the
    checkpoint (``optimizer.state.<fqn>.<key>``) and ``MasterWeights.restore`` gives the fp32 weight.
    Returns what was done (for slimtrain_export.json), or None without such a layer. A parameter whose
    state the checkpoint lacks (a model-only save) keeps its stored weight and is named there."""
    import torch
    import torch.distributed.checkpoint as dcp

    master = comp.master_weights()
    if master is None or not master.stored_keys():
        return None
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    wanted, missing = {}, []
    for name, param in params.items():
        keys = {k: f"optimizer.state.{name}.{k}" for k in master.stored_keys()}
        if not all(v in saved for v in keys.values()):
            missing.append(name)
            continue
        for k, v in keys.items():
            wanted[v] = torch.empty(param.shape, dtype=saved[v].properties.dtype)
    if wanted:
        dcp.load(wanted, checkpoint_id=str(checkpoint))
    with torch.no_grad():
        for name, param in params.items():
            if name in missing:
                continue
            layer_state = {k: wanted[f"optimizer.state.{name}.{k}"] for k in master.stored_keys()}
            stored = param.detach().to(master.storage_dtype)  # exact: the checkpoint holds this dtype
            param.copy_(master.restore(stored, layer_state).to(param.dtype))
    if missing:
        print(f"slimtrain export: {comp.master_method.name}: the checkpoint has no layer state for "
              f"{len(missing)} parameter(s) (e.g. {missing[0]}): they are exported as stored "
              f"({master.storage_dtype})", file=sys.stderr)
    return {"method": comp.master_method.name, "restored": len(params) - len(missing), "missing": missing}


def permute_rope(w, n_heads: int):
    """Rows of a q/k projection from torchtitan's interleaved RoPE pairs to HF's half split."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_state_dict(model, args) -> dict:
    """Dense weights under transformers' LlamaForCausalLM names (the model's parametrizations baked)."""
    from slimtrain.registry.parametrization import bake, iter_parametrized

    for _fqn, linear, _p in list(iter_parametrized(model)):
        bake(linear)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    n_kv = args.n_kv_heads or args.n_heads
    out = {"model.embed_tokens.weight": sd.pop("tok_embeddings.weight"), "model.norm.weight": sd.pop("norm.weight"),
           "lm_head.weight": sd.pop("output.weight")}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
             "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(args.n_layers):
        pre, hf = f"layers.{i}.", f"model.layers.{i}."
        out[hf + "self_attn.q_proj.weight"] = permute_rope(sd.pop(pre + "attention.wq.weight"), args.n_heads)
        out[hf + "self_attn.k_proj.weight"] = permute_rope(sd.pop(pre + "attention.wk.weight"), n_kv)
        for titan, name in names.items():
            out[hf + name + ".weight"] = sd.pop(pre + titan + ".weight")
    left = [k for k in sd if not k.endswith("freqs_cis")]
    if left:
        raise ExportError(f"weights export does not know how to place: {', '.join(left[:5])}")
    return out


def hf_config(args, tokenizer_config: dict):
    from transformers import LlamaConfig

    from slimtrain.titan_integration.flavors import ffn_hidden_dim

    r = args.rope_scaling_args
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=ffn_hidden_dim(args),
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads or args.n_heads,
        # the run trained at max_seq_len; llama3 RoPE scaling needs at least its original length here
        max_position_embeddings=max(args.max_seq_len, r.original_max_position_embeddings),
        rms_norm_eps=args.norm_eps, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": float(args.rope_theta), "factor": r.scaling_factor,
                         "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
                         "original_max_position_embeddings": r.original_max_position_embeddings},
        bos_token_id=_token_id(tokenizer_config, "bos_token", 0), eos_token_id=_token_id(tokenizer_config, "eos_token", 1),
    )


def _token_id(tokenizer_config: dict, key: str, default: int) -> int:
    content = tokenizer_config.get(key)
    for idx, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        if entry.get("content") == content:
            return int(idx)
    return default


def relative_logit_error(hf_model, model, tokens) -> float:
    import torch

    with torch.no_grad():
        ours = model(tokens).float()
        theirs = hf_model(tokens).logits.float()
    return float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12))


def export(run_dir: str, out_dir: str) -> ExportPlan:
    import safetensors.torch
    import torch

    p = plan(run_dir, out_dir)
    try:
        from transformers import LlamaForCausalLM
    except ImportError as exc:
        raise ExportError(f"slimtrain export needs transformers: pip install -e .[hf] ({exc})") from None
    model, args = load_run_model(p)
    assets = Path(p.record["hf_assets_path"])
    tok_cfg_path = assets / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    tmp = p.out_dir.parent / f".{p.out_dir.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        probe = torch.arange(min(32, args.max_seq_len)).remainder(args.vocab_size)[None]
        reference = model(probe).detach()  # before baking: the parametrized model's own forward
        weights = hf_state_dict(model, args)
        safetensors.torch.save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config(args, tok_cfg)
        config.save_pretrained(str(tmp))
        for name in TOKENIZER_FILES:
            if (assets / name).is_file():
                shutil.copy2(assets / name, tmp / name)
        (tmp / "slimtrain_export.json").write_text(json.dumps(
            {"run_dir": str(p.run_dir.resolve()), "checkpoint": str(p.checkpoint), "step": p.step,
             "methods": p.record["methods"], "flavor": p.record["flavor"],
             "master_weights": p.master_weights}, indent=2))
        hf = LlamaForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(probe).logits.float()
        err = float((reference - theirs).abs().max() / reference.abs().max().clamp_min(1e-12))
        if not err <= LOGIT_RTOL:
            raise ExportError(f"the exported model's logits differ from the run's by {err:.2e} (relative; limit {LOGIT_RTOL})")
        os.rename(tmp, p.out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtrain export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run's dump folder (holds slimtrain_run.json and checkpoint/)")
    parser.add_argument("out_dir", help="a new folder for the Hugging Face checkpoint")
    a = parser.parse_args(argv)
    try:
        p = export(a.run_dir, a.out_dir)
    except ExportError as exc:
        print(f"slimtrain export: {exc}", file=sys.stderr)
        return 2
    print(f"slimtrain export: step {p.step} of {p.run_dir} ({', '.join(p.record['methods'])}) -> {p.out_dir} "
          f"(LlamaForCausalLM, safetensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
