"""SinkGD, Stable-SPAM and Adam-mini against their references on the same gradients.

* Adam-mini: the package adam-mini 1.1.1 (``Adam_mini``, its own partition: per head for q/k with
  grouped k, per row elsewhere, one block per norm, Adam on biases), weight decay on.
* Stable-SPAM: an independent statement of the algorithm with the released code's conventions
  (below; always runs), and the released code itself (TianjinYellow/StableSPAM
  ``galore_torch/stablespam.py`` at commit 6a66da1, a local copy (not vendored: no package carries it) in
  ``.reference/``, or ``SLIMTRAIN_STABLESPAM_REF``; that test is skipped, saying so, without it).
* SinkGD: no code released; an independent statement of the paper's SR-Sinkhorn algorithm.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtrain.registry import ConfigError, OptimizerHyper, StepContext, compose

ROOT = Path(__file__).resolve().parents[2]


class LM(nn.Module):
    """torchtitan's LLaMA names at toy size: dim 16, 4 heads of 4, 2 kv heads (wk/wv 8 x 16)."""

    def __init__(self, w2_bias: bool = False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(40, 16)
        layer = nn.Module()
        layer.attention = nn.Module()
        for name, rows in (("wq", 16), ("wk", 8), ("wv", 8), ("wo", 16)):
            setattr(layer.attention, name, nn.Linear(16, rows, bias=False))
        layer.feed_forward = nn.Module()
        layer.feed_forward.w1 = nn.Linear(16, 24, bias=False)
        layer.feed_forward.w2 = nn.Linear(24, 16, bias=w2_bias)
        layer.feed_forward.w3 = nn.Linear(16, 24, bias=False)
        layer.attention_norm = nn.RMSNorm(16)
        self.layers = nn.ModuleList([layer])
        self.norm = nn.RMSNorm(16)
        self.output = nn.Linear(16, 40, bias=False)


def lm(**kw):
    torch.manual_seed(0)
    model = LM(**kw)
    with torch.no_grad():  # norms away from 1 so their weight decay / update is visible
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def gradients(model, steps, spikes=False, seed=1):
    """A fixed gradient sequence; with ``spikes`` some entries are 30x larger on some steps
    (Stable-SPAM's clipping then engages)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        g = {}
        for n, p in model.named_parameters():
            x = torch.randn(p.shape, generator=gen) * (1 + 0.1 * t)
            if spikes and t % 3 == 1:
                x = x * torch.where(torch.rand(p.shape, generator=gen) < 0.05, 30.0, 1.0)
            g[n] = x
        out.append(g)
    return out


def ours(methods, sections, model, hyper):
    comp = compose(methods, sections)
    return comp, comp.build_optimizer(comp.param_groups(model), hyper)


def set_grads(model, g):
    for n, p in model.named_parameters():
        p.grad = g[n].clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- Adam-mini -----------------------------------------------------------------------------------
def test_adam_mini_equals_the_package_with_its_partition():
    from adam_mini import Adam_mini

    hyper = OptimizerHyper(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_model, our_model = lm(w2_bias=True), lm(w2_bias=True)
    ref = Adam_mini(ref_model.named_parameters(), lr=hyper.lr, betas=hyper.betas, eps=hyper.eps,
                    weight_decay=hyper.weight_decay, dim=16, n_heads=4, n_kv_heads=2, verbose=False)
    _, opt = ours(["adam_mini"], {"adam_mini": {"head_dim": 4}}, our_model, hyper)
    assert {g["rule"] for g in opt.param_groups} == {"adam_mini"}
    start = {n: p.detach().clone() for n, p in our_model.named_parameters()}
    for t, g in enumerate(gradients(ref_model, 12)):
        set_grads(ref_model, g)
        set_grads(our_model, g)
        ref.step()
        opt.step()
        for (n, a), b in zip(our_model.named_parameters(), ref_model.parameters()):
            assert rel(a, b) < 1e-6, (t, n, rel(a, b))
    # the partition: the package's v shapes, one number per head (q: 4, grouped k: 2), per row, per norm
    rp = dict(ref_model.named_parameters())
    for n, p in our_model.named_parameters():
        mine = {k: v for k, v in opt.state[p].items() if k in ("vmean", "v")}
        (key, value), = mine.items()
        theirs = ref.state[rp[n]]["vmean" if key == "vmean" else "v"]
        assert value.numel() == theirs.numel(), n
        assert torch.allclose(value.flatten().double(), theirs.flatten().double(), rtol=1e-5), n
    assert opt.state[our_model.layers[0].attention.wq.weight]["vmean"].shape == (4, 1)
    assert opt.state[our_model.layers[0].attention.wk.weight]["vmean"].shape == (2, 1)
    assert opt.state[our_model.output.weight]["vmean"].shape == (40, 1)
    assert opt.state[our_model.norm.weight]["vmean"].shape == ()
    assert opt.state[our_model.layers[0].feed_forward.w2.bias]["v"].shape == (16,)
    # weight decay touched the matrices only (norms and biases exempt, as the package)
    assert all(not torch.equal(p, start[n]) for n, p in our_model.named_parameters())


def test_adam_mini_per_head_blocks_differ_from_per_row():
    """The head partition matters: with head_dim = 1 (one block per row) wq steps differently."""
    hyper = OptimizerHyper(lr=0.01)
    a, b = lm(), lm()
    _, oa = ours(["adam_mini"], {"adam_mini": {"head_dim": 4}}, a, hyper)
    _, ob = ours(["adam_mini"], {"adam_mini": {"head_dim": 1}}, b, hyper)
    for g in gradients(a, 3):
        set_grads(a, g)
        set_grads(b, g)
        oa.step()
        ob.step()
    wq_a, wq_b = a.layers[0].attention.wq.weight, b.layers[0].attention.wq.weight
    assert rel(wq_a, wq_b) > 1e-4
    assert torch.equal(a.layers[0].attention.wv.weight, b.layers[0].attention.wv.weight)


def test_adam_mini_head_dim_that_does_not_divide_is_refused_naming_key_value_and_weight():
    comp = compose(["adam_mini"], {"adam_mini": {"head_dim": 3}})
    with pytest.raises(ConfigError, match=r"\[adam_mini\] head_dim = 3 does not divide the 16 rows of layers.0.attention.wq.weight"):
        comp.param_groups(lm())


# -- Stable-SPAM ---------------------------------------------------------------------------------
def cosine(t, total_T, eta_min):
    if not total_T:
        return 1.0
    return eta_min + (1 - eta_min) * (1 + math.cos(math.pi * t / (total_T + 1))) / 2


def stable_spam_statement(params, grads, *, lr, betas, eps, wd, g1, g2, g3, total_T=0, eta_min=0.5, reset_every=0):
    """Stable-SPAM written independently (double precision) from the paper's Algorithm 1 with the
    released code's conventions: weight decay first; one step count per parameter shared by AdaClip,
    AdaGN and Adam; AdaClip threshold = bias-corrected EMA of max|g|, spiked entries rescaled to
    g / max|g| * threshold; AdaGN rescales g to norm m_hat / (sqrt(v_hat) + eps) of EMAs of ||g|| and
    ||g||^2; gamma1 and beta1 multiplied by the cosine factor. Reset as slimtrain composes it
    (momentum_reset after step s with s % reset_every == 0): moments zeroed, clipping and norm
    statistics kept, the next count 2 (the released code's restart). Returns (params, clipped)."""
    b1, b2 = betas
    w = {k: v.double().clone() for k, v in params.items()}
    st = {k: dict(m=torch.zeros_like(v), v=torch.zeros_like(v), t=0, mx=0.0, mn=0.0, vn=0.0) for k, v in w.items()}
    clipped = 0
    for step, g_all in enumerate(grads, start=1):
        s = cosine(step, total_T, eta_min)
        for k in w:
            S = st[k]
            g = g_all[k].double()
            w[k] = w[k] * (1 - lr * wd)
            S["t"] += 1
            t = S["t"]
            gmax = g.abs().max().item()
            S["mx"] = g3 * S["mx"] + (1 - g3) * gmax
            thr = S["mx"] / (1 - g3**t)
            spike = g.abs() > thr
            clipped += int(spike.sum())
            g = torch.where(spike, torch.sign(g) * (g.abs() / gmax) * thr, g)
            norm = g.norm().item()
            S["mn"] = g1 * s * S["mn"] + (1 - g1 * s) * norm
            S["vn"] = g2 * S["vn"] + (1 - g2) * norm**2
            c = (S["mn"] / (1 - (g1 * s) ** t)) / (math.sqrt(S["vn"] / (1 - g2**t)) + eps)
            if norm > 0:
                g = g * (c / norm)
            bb1 = b1 * s
            S["m"] = bb1 * S["m"] + (1 - bb1) * g
            S["v"] = b2 * S["v"] + (1 - b2) * g * g
            m_hat = S["m"] / (1 - bb1**t)
            w[k] = w[k] - lr * m_hat / (torch.sqrt(S["v"]) / math.sqrt(1 - b2**t) + eps)
            if reset_every and step % reset_every == 0:
                S["m"], S["v"], S["t"] = torch.zeros_like(S["m"]), torch.zeros_like(S["v"]), 1
    return w, clipped


GAMMAS = dict(gamma1=0.7, gamma2=0.9, gamma3=0.999)


@pytest.mark.parametrize("total_T, reset_every", [(0, 0), (20, 0), (20, 5)])
def test_stable_spam_equals_the_statement(total_T, reset_every):
    hyper = OptimizerHyper(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    model = lm()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    methods, sections = ["stable_spam"], {"stable_spam": {**GAMMAS, "total_T": total_T}}
    if reset_every:
        methods.append("momentum_reset")
        sections["momentum_reset"] = {"every": reset_every, "warmup_steps": 0}
    comp, opt = ours(methods, sections, model, hyper)
    assert {g["rule"] for g in opt.param_groups} == {"stable_spam"}
    grads = gradients(model, 12, spikes=True)
    for step, g in enumerate(grads, start=1):
        set_grads(model, g)
        opt.step()
        comp.after_step(StepContext(step, [model], [opt]))
    want, clipped = stable_spam_statement(
        start, grads, lr=0.01, betas=(0.9, 0.999), eps=1e-8, wd=0.1, g1=0.7, g2=0.9, g3=0.999,
        total_T=total_T, reset_every=reset_every,
    )
    assert clipped > 0  # the clipping engaged on the spiked steps
    for n, p in model.named_parameters():
        assert rel(p, want[n]) < 1e-6, (n, rel(p, want[n]))
    # and the statement is sensitive to what it tests: without the reset it is another trajectory
    if reset_every:
        other, _ = stable_spam_statement(start, grads, lr=0.01, betas=(0.9, 0.999), eps=1e-8, wd=0.1,
                                         g1=0.7, g2=0.9, g3=0.999, total_T=total_T)
        assert rel(model.output.weight, other["output.weight"]) > 1e-4


def released_stable_spam():
    """The released optimizer class, from a file outside the repository (not vendored)."""
    path = os.environ.get("SLIMTRAIN_STABLESPAM_REF") or str(ROOT / ".reference" / "stablespam.py")
    if not Path(path).is_file():
        pytest.skip(f"the released Stable-SPAM code is not here ({path}): put a copy of it there "
                    f"(pinned commit), or set SLIMTRAIN_STABLESPAM_REF")
    spec = importlib.util.spec_from_file_location("released_stablespam", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.StableSPAM


@pytest.mark.parametrize("total_T", [0, 20])
def test_stable_spam_equals_the_released_code_without_reset(total_T):
    import warnings

    StableSPAM = released_stable_spam()
    hyper = OptimizerHyper(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    ref_model, our_model = lm(), lm()
    ref = StableSPAM(ref_model.parameters(), lr=0.01, weight_decay=0.1, **GAMMAS,
                     total_T=total_T or None, eta_min=0.5, update_proj_gap=0)
    _, opt = ours(["stable_spam"], {"stable_spam": {**GAMMAS, "total_T": total_T}}, our_model, hyper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the released code steps its LR scheduler with an epoch
        for t, g in enumerate(gradients(ref_model, 12, spikes=True)):
            set_grads(ref_model, g)
            set_grads(our_model, g)
            ref.step()
            opt.step()
            for (n, a), b in zip(our_model.named_parameters(), ref_model.parameters()):
                assert rel(a, b) < 1e-6, (t, n, rel(a, b))
    p = our_model.output.weight
    rp = ref_model.output.weight
    for mine, theirs in (("clip_max", "m_max_t"), ("norm_m", "m_norm_t"), ("norm_v", "v_norm_t")):
        assert opt.state[p][mine].item() == pytest.approx(float(ref.state[rp][theirs]), rel=1e-6), mine


def test_stable_spam_with_momentum_reset_against_the_released_reset():
    """momentum_reset every 5 vs the released update_proj_gap 5 (weight decay 0): equal before the
    reset; the reset step's update differs (the released code takes it with step-1 bias corrections
    on the old moments); from then on every update is equal again (same zeroed moments, kept
    statistics and counts), so the parameters keep exactly the step-5 offset."""
    import warnings

    StableSPAM = released_stable_spam()
    hyper = OptimizerHyper(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ref_model, our_model = lm(), lm()
    ref = StableSPAM(ref_model.parameters(), lr=0.01, weight_decay=0.0, **GAMMAS, total_T=None, update_proj_gap=5)
    comp, opt = ours(["stable_spam", "momentum_reset"],
                     {"stable_spam": GAMMAS, "momentum_reset": {"every": 5, "warmup_steps": 0}}, our_model, hyper)
    offset = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, g in enumerate(gradients(ref_model, 9, spikes=True), start=1):  # next reset: 10
            set_grads(ref_model, g)
            set_grads(our_model, g)
            ref.step()
            opt.step()
            comp.after_step(StepContext(step, [our_model], [opt]))
            diff = {n: (a - b).detach().clone() for (n, a), b in zip(our_model.named_parameters(), ref_model.parameters())}
            if step < 5:
                assert all(d.abs().max() < 1e-6 for d in diff.values()), step
            elif step == 5:
                offset = diff
                assert all(d.abs().max() > 1e-4 for d in diff.values())
                w = our_model.output.weight
                assert torch.count_nonzero(opt.state[w]["exp_avg"]) == 0
                assert torch.count_nonzero(ref.state[ref_model.output.weight]["exp_avg"]) == 0
            else:
                for n, d in diff.items():
                    assert torch.allclose(d, offset[n], atol=1e-6), (step, n, (d - offset[n]).abs().max())


@pytest.mark.parametrize("reset_step, kept", [(True, False), (False, True)])
def test_stable_spam_reset_declarations(reset_step, kept):
    model = lm()
    comp, opt = ours(["stable_spam", "momentum_reset"],
                     {"momentum_reset": {"every": 2, "warmup_steps": 0, "reset_step": reset_step}},
                     model, OptimizerHyper(lr=0.01))
    w = model.output.weight
    for step, g in enumerate(gradients(model, 2, spikes=True), start=1):
        set_grads(model, g)
        opt.step()
        before = {k: v.clone() for k, v in opt.state[w].items()}
        comp.after_step(StepContext(step, [model], [opt]))
    state = opt.state[w]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(before[key]) > 0 and torch.count_nonzero(state[key]) == 0
    for key in ("clip_max", "norm_m", "norm_v", "total_steps"):
        assert state[key].item() == before[key].item() != 0, key
    assert (state["step"].item() == 2) is kept


# -- SinkGD --------------------------------------------------------------------------------------
def sinkgd_statement(params, grads, *, lr, wd, iterations):
    """Algorithm SinkGD (arXiv 2502.06742), written independently in double precision: for each
    matrix G (m x n), L times: X <- sqrt(n) Q(X)^-1 X with Q the diagonal of row l2 norms, then
    X <- sqrt(m) X R(X)^-1 with R the diagonal of column l2 norms; W <- W (1 - lr wd) - lr X."""
    w = {k: v.double().clone() for k, v in params.items()}
    for g_all in grads:
        for k in w:
            x = g_all[k].double()
            m, n = x.shape
            for _ in range(iterations):
                x = math.sqrt(n) * torch.diag(1 / x.norm(dim=1)) @ x
                x = math.sqrt(m) * x @ torch.diag(1 / x.norm(dim=0))
            w[k] = w[k] * (1 - lr * wd) - lr * x
    return w


@pytest.mark.parametrize("iterations", [1, 5])
def test_sinkgd_equals_the_papers_algorithm(iterations):
    hyper = OptimizerHyper(lr=0.01, weight_decay=0.1)
    model = lm()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, opt = ours(["sinkgd"], {"sinkgd": {"iterations": iterations, "lr_ratio": 0.5}}, model, hyper)
    hidden = [n for n in start if ".attention.w" in n or ".feed_forward.w" in n]
    assert {g["rule"]: len(g["params"]) for g in opt.param_groups} == {"sinkgd": 7, "adamw": 4}
    grads = gradients(model, 6)
    for g in grads:
        set_grads(model, g)
        opt.step()
    want = sinkgd_statement({n: start[n] for n in hidden}, grads, lr=0.005, wd=0.1, iterations=iterations)
    got = dict(model.named_parameters())
    for n in hidden:
        assert rel(got[n], want[n]) < 1e-6, (n, rel(got[n], want[n]))
        assert not opt.state[got[n]]  # stateless


def test_sinkgd_five_passes_balance_rows_and_columns():
    """What the update depends on: after L passes the last normalization is exact on columns and the
    rows are close (the Sinkhorn fixed point); one pass leaves the rows unbalanced."""
    from slimtrain.plugins.sinkgd import sr_sinkhorn

    g = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 10, 16)
    spreads = {}
    for L in (1, 5):
        x = sr_sinkhorn(g, L)
        assert torch.allclose(x.norm(dim=0), torch.full((16,), math.sqrt(24)), rtol=1e-5)
        spreads[L] = (x.norm(dim=1) / math.sqrt(16) - 1).abs().max().item()
    assert spreads[5] < 0.05 < spreads[1], spreads


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, key, value, allowed",
    [
        ("sinkgd", "iterations", 0, "[1, 100]"),
        ("sinkgd", "iterations", -2, "[1, 100]"),
        ("sinkgd", "lr_ratio", 0.0, "(0, inf)"),
        ("stable_spam", "gamma3", 1.0, "(0.0, 1.0)"),
        ("stable_spam", "gamma3", 0.0, "(0.0, 1.0)"),
        ("stable_spam", "gamma1", 1.5, "(0.0, 1.0)"),
        ("stable_spam", "gamma2", -0.1, "(0.0, 1.0)"),
        ("stable_spam", "total_T", -1, "[0, inf)"),
        ("stable_spam", "eta_min", 0.0, "(0.0, 1.0]"),
        ("adam_mini", "head_dim", 0, "[1, inf)"),
    ],
)
def test_bad_settings_name_key_value_and_range(method, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        compose([method], {method: {key: value}})
    msg = str(err.value)
    assert f"[{method}] {key} = {value!r}" in msg and allowed in msg, msg


def test_sinkgd_refuses_non_matrix_parameters():
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(16, 16)

    comp = compose(["sinkgd"], {"sinkgd": {"targets": ["wq"], "roles": ["weight", "bias"]}})
    with pytest.raises(ConfigError, match=r"\[sinkgd\] selects wq.bias with shape \(16,\).*needs a matrix"):
        comp.param_groups(Biased())


def _adam_mini_wq_vmean_rows(sections, description):
    from slimtrain.registry import ModelDescription  # noqa: F401

    comp = compose(["adam_mini"], sections)
    if description is not None:
        comp.describe_model(description)
    spec = next(s for s in llama_specs_for_heads() if s.name == "layers.0.attention.wq.weight")
    return comp.rule_for(spec).state_specs(spec)[-1].shape[0]


def llama_specs_for_heads():
    from slimtrain.registry import llama_dense_specs

    return llama_dense_specs(32, 64, 1, 50, 4)  # 4 heads of 8


def test_adam_mini_reads_the_head_size_from_the_model_description():
    from slimtrain.registry import ModelDescription

    desc = ModelDescription(hidden_size=32, num_heads=4, num_layers=1, vocab_size=50)
    assert _adam_mini_wq_vmean_rows({}, desc) == 4  # one v per head: 32 rows / heads of 8
    assert _adam_mini_wq_vmean_rows({"adam_mini": {"head_dim": 8}}, desc) == 4  # an agreeing key: fine
    assert _adam_mini_wq_vmean_rows({"adam_mini": {"head_dim": 4}}, None) == 8  # no description: the key
    two = ModelDescription(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50)
    assert _adam_mini_wq_vmean_rows({}, two) == 2  # heads of 16: the description decides


def test_adam_mini_head_dim_disagreeing_with_the_description_is_refused():
    from slimtrain.registry import ModelDescription

    desc = ModelDescription(hidden_size=32, num_heads=4, num_layers=1, vocab_size=50)
    with pytest.raises(ConfigError, match=r"\[adam_mini\] head_dim = 16 disagrees with the model's head size 8"):
        _adam_mini_wq_vmean_rows({"adam_mini": {"head_dim": 16}}, desc)
    with pytest.raises(ConfigError, match=r"\[adam_mini\] head_dim is not set and the model's head size is unknown"):
        _adam_mini_wq_vmean_rows({}, None)
