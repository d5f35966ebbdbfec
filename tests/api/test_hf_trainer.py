"""The Hugging Face Trainer adapter on a tiny LlamaForCausalLM built from a config (hidden 64, 2 layers)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the hf extra; scripts/setup.sh installs it

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from slimtrain import ConfigError  # noqa: E402
from slimtrain.hf import SlimtrainTrainer  # noqa: E402

RECIPE = {"methods": ["sltrain", "refactorization", "momentum_reset"], "sltrain": {"rank": 4},
          "refactorization": {"every": 2}, "momentum_reset": {"every": 3, "warmup_steps": 2}}


class Rule(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=16):
        g = torch.Generator().manual_seed(0)
        x = torch.empty(n, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, 64, (n,), generator=g)
        for i in range(1, seq):
            x[:, i] = (x[:, i - 1] * 5 + 3) % 64
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, vocab_size=64, max_position_embeddings=32))


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                learning_rate=1e-2, warmup_steps=1, logging_steps=1, save_steps=3, report_to=[], use_cpu=True,
                seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def test_trains_resumes_bitwise_and_runs_step_hooks(tmp_path):
    a = SlimtrainTrainer(model=llama(), args=args(tmp_path / "a"), train_dataset=Rule(), recipe=RECIPE)
    assert len(a.slimtrain.parametrized) == 14  # q_proj ... down_proj of both layers: the default targets
    assert a.slimtrain.description.head_dim == 16 and a.slimtrain.description.num_layers == 2
    a.train()
    losses = [e["loss"] for e in a.state.log_history if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    opt = a.slimtrain.optimizer
    assert opt.global_step == 6
    # momentum_reset ran after step 6 (a step hook): every moment is zero now
    assert all(float(s["exp_avg"].abs().sum()) == 0.0 for s in opt.state.values() if "exp_avg" in s)
    b = SlimtrainTrainer(model=llama(), args=args(tmp_path / "b"), train_dataset=Rule(), recipe=RECIPE)
    b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # bitwise
    assert [e["loss"] for e in b.state.log_history if "loss" in e] == losses  # the checkpoint's 3, then the same 3


def test_unknown_hf_model_is_named_with_what_is_supported(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ConfigError, match=r"does not know GPT2LMHeadModel \(model_type 'gpt2'\).*LlamaForCausalLM"):
        SlimtrainTrainer(model=gpt2, args=args(tmp_path), train_dataset=Rule(), recipe=RECIPE)


def test_per_layer_updates_with_global_clipping_refused_before_training(tmp_path):
    model = llama()
    with pytest.raises(ConfigError, match="max_norm"):
        SlimtrainTrainer(model=model, args=args(tmp_path, max_grad_norm=1.0), train_dataset=Rule(),
                         recipe={"methods": ["sltrain", "per_layer_updates"], "sltrain": {"rank": 4}})
    assert not any("parametrizations" in n for n, _ in model.named_parameters())  # untouched


def test_per_layer_updates_with_accumulation_step_after_the_last_micro_batch(tmp_path):
    """Gradient accumulation 2 with per-layer updates: one update per optimizer step, after the
    second backward (the Trainer's own loop drives it)."""
    t = SlimtrainTrainer(model=llama(), args=args(tmp_path, max_steps=2, gradient_accumulation_steps=2, max_grad_norm=0.0,
                                                  save_steps=10), train_dataset=Rule(),
                         recipe={"methods": ["sltrain", "per_layer_updates"], "sltrain": {"rank": 4}})
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train()
    assert t.slimtrain.per_layer is not None and t.slimtrain.optimizer.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_per_layer_updates_train_without_accumulation(tmp_path):
    """Per-layer updates step in backward; the Trainer's optimizer.step() then only counts the step."""
    t = SlimtrainTrainer(model=llama(), args=args(tmp_path, max_steps=2, gradient_accumulation_steps=1, max_grad_norm=0.0,
                                                  save_steps=10), train_dataset=Rule(),
                         recipe={"methods": ["sltrain", "per_layer_updates"], "sltrain": {"rank": 4}})
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train()
    assert t.slimtrain.per_layer is not None and t.slimtrain.optimizer.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())
