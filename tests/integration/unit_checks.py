"""In-process checks of titan_integration's pieces, run in ONE fresh subprocess by test_titan_units.py.

Why a subprocess: the CPU shim must run before torchtitan is imported, and other test modules
import torchtitan in the pytest process; these checks need a process where titan_integration
comes first. Each ``check_*`` raises AssertionError on failure; ``main`` prints a JSON map
name -> null (passed) or the error text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from slimtrain.titan_integration import cpu_shim  # noqa: E402

cpu_shim.apply()

import torch  # noqa: E402
from torch import nn  # noqa: E402

RECIPES = ["full_rank", "low_rank", "lora", "relora", "galore", "fira", "sltrain", "sltrain_restarts",
           "low_rank_restarts", "apollo", "apollo_mini", "muon", "scale", "sltrain_apollo_mini",
           "sinkgd", "stable_spam", "adam_mini"]
# (methods, learning rate) each recipe must have (methods.md: paper defaults at 60M)
EXPECTED = {
    "full_rank": ([], 1e-3),
    "low_rank": (["low_rank"], 1e-3),
    "lora": (["lora"], 1e-3),
    "relora": (["lora", "lora_merge", "momentum_reset"], 2e-3),
    "galore": (["galore"], 0.01),
    "fira": (["fira"], 0.01),
    "sltrain": (["sltrain"], 0.003),
    "sltrain_restarts": (["sltrain", "refactorization", "momentum_reset"], 0.003),
    "low_rank_restarts": (["low_rank", "refactorization", "momentum_reset"], 1e-3),
    "apollo": (["apollo"], 0.01),
    "apollo_mini": (["apollo_mini"], 0.01),
    "muon": (["muon"], 1e-3),
    "scale": (["scale"], 1e-3),
    "sltrain_apollo_mini": (["sltrain", "apollo_mini"], 0.003),
    "sinkgd": (["sinkgd"], 1e-3),
    "stable_spam": (["stable_spam", "momentum_reset"], 1e-3),
    "adam_mini": (["adam_mini"], 1e-3),
}


def _parse(args):
    from torchtitan.config import ConfigManager

    from slimtrain.titan_integration.train import complete_argv

    return ConfigManager().parse_args(complete_argv(args))


def check_cpu_shim():
    import torchtitan.distributed.utils as du
    import torchtitan.tools.utils as tu
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as fc

    if torch.cuda.is_available():
        assert not cpu_shim.is_active()
        return
    assert cpu_shim.is_active()
    assert tu.device_type == "cpu"
    assert tu.device_module.current_device() == 0 and du.device_module is tu.device_module
    assert tu.device_module.get_device_properties("cpu").total_memory > 0
    assert "reserved_bytes.all.peak" in tu.device_module.memory_stats("cpu")
    # torch's own view of the cpu device module is untouched (DCP allocates on its current_device)
    assert torch._utils._get_device_module("cpu") is torch.cpu
    # gloo has no PREMUL_SUM: FSDP must reduce with plain SUM on cpu
    _, _, rs, ar = fc._get_gradient_divide_factors(None, None, torch.float32, "cpu", 1.0)
    assert rs == torch.distributed.ReduceOp.SUM and ar == torch.distributed.ReduceOp.SUM


def check_flavors_match_paper():
    from torchtitan.models.llama3 import Transformer

    from slimtrain.titan_integration.flavors import FLAVORS, PAPER_SHAPES, ffn_hidden_dim

    for name, shape in PAPER_SHAPES.items():
        args = FLAVORS[name]
        with torch.device("meta"):
            model = Transformer(args)
        block = model.layers["0"]
        assert block.feed_forward.w1.weight.shape == (shape.ffn, shape.dim), name
        assert block.feed_forward.w2.weight.shape == (shape.dim, shape.ffn), name
        assert block.attention.wq.weight.shape == (shape.dim, shape.dim), name
        assert block.attention.wk.weight.shape == (shape.dim, shape.dim), name  # no GQA
        assert len(model.layers) == shape.n_layers and args.n_heads == shape.n_heads, name
        assert model.tok_embeddings.weight.shape == (32000, shape.dim), name
        assert ffn_hidden_dim(args) == shape.ffn
    # tiny: small enough for CPU, wide enough that the recipes' paper rank 128 is a real low rank
    assert FLAVORS["tiny"].vocab_size == 4096 and 2 * 128 <= FLAVORS["tiny"].dim <= 256


def check_run_defaults():
    from slimtrain.titan_integration.train import complete_argv

    argv = complete_argv(["--job.config_file", "plugins/sltrain.toml", "--model.flavor", "tiny",
                          "--training.local_batch_size", "2"])
    cfg = _parse(argv)
    assert cfg.training.local_batch_size == 2  # the user's flag wins
    assert cfg.training.global_batch_size == -1 and cfg.validation.freq == 100  # tiny's run scale
    cfg = _parse(["--job.config_file", "plugins/sltrain.toml"])
    assert cfg.training.local_batch_size == 64 and cfg.training.global_batch_size == 512  # paper scale


def check_job_config_sections_mirror_methods():
    from slimtrain.registry import get_methods

    from slimtrain.titan_integration.job_config import JobConfig

    fields = {f.name: f for f in dataclasses.fields(JobConfig)}
    assert "slimtrain" in fields
    for name, info in get_methods().items():
        assert name in fields, name
        section = fields[name].default_factory()
        config = info.cls.Config()
        assert [f.name for f in dataclasses.fields(section)] == [f.name for f in dataclasses.fields(config)]
        for f in dataclasses.fields(config):
            assert getattr(section, f.name) == getattr(config, f.name), (name, f.name)


def check_cli_overrides_and_unknown_keys():
    cfg = _parse(["--job.config_file", "plugins/sltrain.toml", "--sltrain.rank", "64",
                  "--slimtrain.methods", "sltrain,refactorization"])
    assert cfg.sltrain.rank == 64 and cfg.sltrain.delta == 0.03
    assert list(cfg.slimtrain.methods) == ["sltrain", "refactorization"]
    # without custom_config_module/model.name in the TOML, train.py supplies slimtrain's
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write('[slimtrain]\nmethods = ["lora"]\n[lora]\nrank = 4\n')
    cfg = _parse(["--job.config_file", f.name])
    assert cfg.model.name == "slimtrain_llama" and cfg.lora.rank == 4
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write('[sltrain]\nno_such_key = 1\n')
    try:
        _parse(["--job.config_file", f.name])
    except ValueError as exc:
        assert "no_such_key" in str(exc)
    else:
        raise AssertionError("unknown TOML key accepted")


def check_lists_from_toml_and_cli_without_warnings():
    """Method lists and patterns: a TOML list, or several CLI values (space- or comma-separated),
    parse to the same tuple and raise no warning from the CLI parser."""
    import warnings

    from slimtrain.titan_integration import context

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write('[slimtrain]\nmethods = ["galore", "fira"]\n'
                '[galore]\ntargets = ["*.wq", "*.wk"]\nroles = ["weight"]\n'
                '[fira]\ntargets = ["*.w1"]\n')
    cases = {
        "toml": ["--job.config_file", f.name],
        "cli, spaces": ["--slimtrain.methods", "galore", "fira", "--galore.targets", "*.wq", "*.wk",
                        "--fira.targets", "*.w1"],
        "cli, commas": ["--slimtrain.methods", "galore,fira", "--galore.targets", "*.wq,*.wk",
                        "--fira.targets", "*.w1"],
    }
    for label, args in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = _parse(args)
        messages = [str(w.message) for w in caught if "annotated with type" in str(w.message)
                    or "Unrecognized" in str(w.message)]
        assert not messages, (label, messages)
        assert tuple(cfg.slimtrain.methods) == ("galore", "fira"), (label, cfg.slimtrain.methods)
        assert tuple(cfg.galore.targets) == ("*.wq", "*.wk") and tuple(cfg.galore.roles) == ("weight",), label
        assert context.build_composition(cfg).method_names[:2] == ["galore", "fira"], label


def check_slimtrain_defaults_have_one_owner():
    """custom_config_module, model.name and the converter come from train.py's complete_argv only:
    the recipes do not repeat them, a user's own converters keep theirs, and a config without
    the converter is refused by the trainer instead of being patched a second way."""
    import glob

    from slimtrain.titan_integration.trainer import prepare_job_config

    for path in sorted(glob.glob(os.path.join(ROOT, "plugins", "*.toml"))):
        text = open(path).read()
        for key in ("custom_config_module", 'name = "slimtrain_llama"', "converters"):
            assert key not in text, (os.path.basename(path), key)
    cfg = _parse(["--job.config_file", "plugins/sltrain.toml", "--model.converters", "float8"])
    assert list(cfg.model.converters) == ["float8", "slimtrain"], cfg.model.converters
    cfg = _parse(["--job.config_file", "plugins/sltrain.toml"])
    assert list(cfg.model.converters) == ["slimtrain"] and cfg.model.name == "slimtrain_llama"
    cfg.model.converters = []
    try:
        prepare_job_config(cfg)
    except ValueError as exc:
        assert "lacks 'slimtrain'" in str(exc)
    else:
        raise AssertionError("a config without the slimtrain converter was accepted")


def check_every_recipe_composes():
    from slimtrain.titan_integration import context

    for recipe in RECIPES:
        cfg = _parse(["--job.config_file", f"plugins/{recipe}.toml"])
        methods, lr = EXPECTED[recipe]
        assert list(cfg.slimtrain.methods) == methods, recipe
        comp = context.build_composition(cfg)
        assert comp.method_names[: len(methods)] == methods, recipe
        assert cfg.optimizer.lr == lr, (recipe, cfg.optimizer.lr)
        assert cfg.model.flavor == "60m" and cfg.training.seq_len == 256, recipe
        assert cfg.lr_scheduler.decay_type == "cosine" and cfg.lr_scheduler.min_lr_factor == 0.1, recipe
        assert cfg.slimtrain.warmup_fraction == 0.1 and cfg.optimizer.weight_decay == 0.0, recipe
        assert cfg.training.dataset == "slimtrain" and cfg.validation.enable, recipe
        assert cfg.checkpoint.enable and not cfg.checkpoint.last_save_model_only, recipe
        for m in comp.methods:
            if getattr(m.config, "rank", None) is not None:
                assert m.config.rank == (1 if m.name == "apollo_mini" else 128), (recipe, m.name)


def check_lr_factor_and_true_step_after_resume():
    """LR = base * schedule(s-1) * lr_factor(s); hooks see 1..n, and continue after a reload."""
    from slimtrain.registry import compose
    from torchtitan.config import LRScheduler, Optimizer

    from slimtrain.titan_integration import context, optimizer

    comp = compose(["momentum_reset"], {"momentum_reset": {"every": 3, "warmup_steps": 2, "warmup_start": 0.1}})
    seen = []
    original_after_step = comp.after_step

    def after_step(ctx):
        seen.append(ctx.step)
        original_after_step(ctx)

    comp.after_step = after_step
    context._STATE = context.RunState(job_config=None, composition=comp)
    sched_cfg = LRScheduler(warmup_steps=2, decay_type="cosine", min_lr_factor=0.1)

    def build(model):
        opts = optimizer.build_optimizers([model], Optimizer(lr=0.5, implementation="for-loop"), None)
        return opts, optimizer.build_lr_schedulers(opts, sched_cfg, 8)

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opts, scheds = build(model)
    base = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    from torchtitan.components.lr_scheduler import build_lr_schedulers

    plain = build_lr_schedulers([base], sched_cfg, 8).schedulers[0].lr_lambdas[0]
    lrs = []
    for s in range(1, 9):
        lrs.append(opts.optimizers[0].param_groups[0]["lr"])
        model(torch.ones(1, 3)).sum().backward()
        opts.step()
        scheds.step()
        opts.zero_grad()
        if s == 4:
            saved = scheds.state_dict()
            saved_optim = opts.state_dict()
    assert seen == list(range(1, 9)), seen
    for s, lr in enumerate(lrs, start=1):
        want = 0.5 * plain(s - 1) * comp.lr_factor(s)
        assert abs(lr - want) < 1e-12, (s, lr, want)
    assert comp.lr_factor(4) == 0.1 and comp.lr_factor(5) == 0.55 and comp.lr_factor(6) == 1.0
    # a "resumed" container continues at step 5: the optimizer owns the step (restored with its state)
    seen.clear()
    model2 = nn.Linear(3, 2)
    opts2, scheds2 = build(model2)
    assert opts2.current_step() == 1
    scheds2.load_state_dict(saved)
    opts2.load_state_dict(saved_optim)
    assert opts2.current_step() == 5
    model2(torch.ones(1, 3)).sum().backward()
    opts2.step()
    assert seen == [5], seen
    context.reset()


def check_memory_breakdown():
    from slimtrain.titan_integration.memory import measure

    model = nn.Linear(4, 3)
    model(torch.ones(2, 4)).sum().backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    m = measure([model], [opt], peak_bytes=123, peak_label="x")
    assert m.trainable_param_bytes == 15 * 4 and m.grad_bytes == 15 * 4
    assert m.optimizer_state_bytes >= 2 * 15 * 4
    assert any("optimizer state" in line for line in m.lines())


# (extra args on plugins/sltrain.toml at nano, what the refusal must say): issue 25's late failures
# and settings accepted with exit 0, each refused before the model, naming key, value and range
BAD_SETTINGS = [
    (["--optimizer.lr", "-0.001"], "[optimizer] lr = -0.001: allowed: a finite number > 0"),
    (["--optimizer.lr", "0"], "[optimizer] lr = 0.0: allowed: a finite number > 0"),
    (["--optimizer.lr", "nan"], "[optimizer] lr = nan: allowed: a finite number > 0"),
    (["--checkpoint.interval", "0"], "[checkpoint] interval = 0: allowed: an integer >= 1"),
    (["--training.local_batch_size", "0"], "[training] local_batch_size = 0: allowed: an integer >= 1"),
    (["--training.seq_len", "0"], "[training] seq_len = 0: allowed: an integer >= 1"),
    (["--validation.seq_len", "-4"], "[validation] seq_len = -4: allowed: an integer >= 1"),
    (["--slimtrain.loss_log", "/nonexistent_i25/dir/loss.jsonl"],
     "[slimtrain] loss_log = '/nonexistent_i25/dir/loss.jsonl': its folder /nonexistent_i25/dir does not exist"),
    (["--slimtrain.checkpoint_on_damage", "ignore"], "[slimtrain] checkpoint_on_damage = 'ignore': allowed: stop, fallback"),
    (["--sltrain.targets", "*.nothing_here"], "[sltrain] selects no trainable parameter of the model: targets = ['*.nothing_here']"),
    (["--slimtrain.methods", "sltrain", "--slimtrain.methods", "low_rank"], "--slimtrain.methods given 2 times"),
    (["--slimtrain.methods"], "--slimtrain.methods is given without a method name"),
    (["--slimtrain.methods", "--model.flavor", "nano"], "--slimtrain.methods is given without a method name"),
    (["--slimtrain.methods="], "--slimtrain.methods is given without a method name"),
    (["--slimtrain.methods", "galore", "--galore.rank", "8", "--galore.convention", "reference", "--galore.power_iters", "4"],
     "[galore] power_iters = 4 contradicts convention = 'reference': the released galore-torch 1.0 refreshes by its exact SVD"),
]


def check_bad_settings_are_refused_before_the_model():
    from slimtrain.registry import SlimtrainError
    from slimtrain.titan_integration import context, preflight
    from slimtrain.titan_integration.flavors import FLAVORS
    from slimtrain.titan_integration.train import ArgumentError
    from slimtrain.titan_integration.trainer import prepare_job_config

    failures = []
    for extra, expected in BAD_SETTINGS:
        args = ["--job.config_file", "plugins/sltrain.toml", "--model.flavor", "nano", "--sltrain.rank", "8",
                "--job.dump_folder", tempfile.mkdtemp(), *extra]
        try:  # what SlimTrainer.__init__ runs before torch.distributed, the corpus or the model
            config = _parse(args)
            prepare_job_config(config)
            context.reset()
            composition = context.composition_for(config)
            preflight.check_before_model(config, composition, FLAVORS[config.model.flavor])
            failures.append(f"{extra}: accepted")
        except (SlimtrainError, ArgumentError) as exc:
            if expected not in str(exc):
                failures.append(f"{extra}: {exc}")
        finally:
            context.reset()
    assert not failures, "\n".join(failures)


def check_an_unknown_toml_key_names_its_section_and_the_allowed_keys():
    from slimtrain.registry import ConfigError

    for (old, new), expected in [
        (("[sltrain]\n", "[sltrain]\nranks = 8\n"), "unknown TOML key(s) ranks in [sltrain]; allowed: "),
        (("[training]\n", "[training]\nsteps_total = 8\n"), "unknown TOML key(s) steps_total in [training]; allowed: "),
        (("[model]\n", "[no_such_section]\nx = 1\n[model]\n"), "unknown TOML section(s) [no_such_section]; allowed: "),
    ]:
        addition = new
        toml = os.path.join(tempfile.mkdtemp(), "run.toml")
        with open("plugins/sltrain.toml") as f:
            text = f.read()
        assert old in text
        with open(toml, "w") as f:
            f.write(text.replace(old, new, 1))
        try:
            _parse(["--job.config_file", toml, "--model.flavor", "nano"])
        except ConfigError as exc:
            assert expected in str(exc), str(exc)
            assert "run_train.sh" not in str(exc)
            if "[sltrain]" in expected:
                assert "rank" in str(exc).split("allowed: ")[1].split(", ")
        else:
            raise AssertionError(f"{addition!r} was accepted")


def check_a_string_for_methods_in_toml_is_refused():
    from slimtrain.registry import ConfigError
    from slimtrain.titan_integration import context

    toml = os.path.join(tempfile.mkdtemp(), "run.toml")
    with open("plugins/sltrain.toml") as f:
        text = f.read().replace('methods = ["sltrain"]', 'methods = "sltrain"')
    with open(toml, "w") as f:
        f.write(text)
    config = _parse(["--job.config_file", toml, "--model.flavor", "nano"])
    try:
        context.composition_for(config)
    except ConfigError as exc:
        assert "[slimtrain] methods = 'sltrain': allowed: a list of method names" in str(exc), str(exc)
    else:
        raise AssertionError("methods = \"sltrain\" was accepted")
    finally:
        context.reset()


def main():
    results = {}
    for name, fn in list(globals().items()):
        if name.startswith("check_") and callable(fn):
            try:
                fn()
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
