"""Bad ``[parallelism]`` input fails before the model is built, naming the key, the value and what
divides (titan_integration/parallel_checks.py). The checks are unit-tested on a stand-in job config;
two runs of the user's command (plain python, a WORLD_SIZE as torchrun would set) show that
train.py stops before building anything."""

from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from .helpers import ROOT, env

pytestmark = pytest.mark.integration


def job(flavor="nano", seq_len=64, **degrees):
    p = dict(data_parallel_replicate_degree=1, data_parallel_shard_degree=-1, context_parallel_degree=1,
             tensor_parallel_degree=1, pipeline_parallel_degree=1)
    p.update(degrees)
    return SimpleNamespace(parallelism=SimpleNamespace(**p), model=SimpleNamespace(flavor=flavor),
                           training=SimpleNamespace(seq_len=seq_len), checkpoint=SimpleNamespace(enable=False))


def check(methods, sections=None, world=4, flavor="nano", **degrees):
    from slimtrain.registry import compose
    from slimtrain.titan_integration import parallel_checks
    from slimtrain.titan_integration.flavors import FLAVORS

    return parallel_checks.check_before_model(job(flavor, **degrees), compose(methods, sections or {}),
                                              FLAVORS[flavor], world=world)


def test_valid_meshes_resolve_the_shard_degree():
    assert check(["adamw"], data_parallel_replicate_degree=2)["data_parallel_shard_degree"] == 2
    assert check(["galore"], {"galore": {"rank": 8}}, data_parallel_replicate_degree=2,
                 data_parallel_shard_degree=2)["data_parallel_shard_degree"] == 2
    assert check(["adamw"], tensor_parallel_degree=2)["data_parallel_shard_degree"] == 2
    assert check(["adamw", "momentum_reset"], tensor_parallel_degree=2, data_parallel_shard_degree=2)
    # every update rule runs under TP (row-based ones on their row view)
    for rule in ("galore", "fira", "apollo", "apollo_mini", "muon", "scale", "sinkgd", "adam_mini", "stable_spam"):
        assert check([rule], {"galore": {"rank": 8}} if rule == "galore" else {}, tensor_parallel_degree=2)
    # parametrizations that declare tp_dims: their factors follow the TP plan
    for methods in (["low_rank"], ["lora", "lora_merge"], ["low_rank", "refactorization"]):
        assert check(methods, tensor_parallel_degree=2)


@pytest.mark.parametrize(
    "methods,degrees,world,expected",
    [
        (["adamw"], dict(data_parallel_replicate_degree=2, data_parallel_shard_degree=3), 4,
         r"parallelism\.data_parallel_shard_degree = 3 x parallelism\.data_parallel_replicate_degree \(2\) = 6 "
         r"but the world size is 4"),
        (["adamw"], dict(data_parallel_replicate_degree=3), 4,
         r"parallelism\.data_parallel_replicate_degree \(3\) = 3 does not divide the world size 4"),
        (["adamw"], dict(tensor_parallel_degree=0), 4, r"parallelism\.tensor_parallel_degree = 0: allowed: an integer >= 1"),
        (["adamw"], dict(tensor_parallel_degree=4, data_parallel_shard_degree=1), 4,
         r"parallelism\.tensor_parallel_degree = 4 does not divide the nano flavor's n_heads = 2 \(attention heads"),
        (["adamw"], dict(tensor_parallel_degree=3, data_parallel_shard_degree=1), 3,
         r"tensor_parallel_degree = 3 does not divide the nano flavor's n_heads = 2 .* divisor of 2: 1, 2"),
        (["sltrain"], dict(tensor_parallel_degree=2), 4,
         r"tensor parallelism \(parallelism\.tensor_parallel_degree = 2\) is not supported with the "
         r"weight-parametrizing method\(s\) sltrain: its parametrization declares no `tp_dims`.*sparse parametrization"),
        (["adamw", "state_8bit"], dict(tensor_parallel_degree=2), 4, r"not supported with state_8bit"),
        (["adamw", "master_weights_bf16"], dict(tensor_parallel_degree=2), 4, r"not supported with master_weights_bf16"),
        (["low_rank"], dict(pipeline_parallel_degree=2), 4,
         r"parallelism\.pipeline_parallel_degree = 2 is not supported with a weight-parametrizing method \(low_rank\)"),
    ],
    ids=["product", "replicate-divides", "zero", "tp-heads", "tp-divisors", "tp-sltrain", "tp-8bit", "tp-master-weights",
         "pp-low-rank"],
)
def test_bad_parallelism_is_refused(methods, degrees, world, expected):
    from slimtrain.registry import ConfigError

    sections = {"galore": {"rank": 8}} if "galore" in methods else {}
    with pytest.raises(ConfigError, match=expected):
        check(methods, sections, world=world, **degrees)


def test_tp_must_divide_the_sequence():
    from slimtrain.registry import ConfigError

    with pytest.raises(ConfigError, match=r"tensor_parallel_degree = 2 does not divide the nano flavor's "
                                          r"training\.seq_len = 63 \(sequence-parallel"):
        from slimtrain.registry import compose
        from slimtrain.titan_integration import parallel_checks
        from slimtrain.titan_integration.flavors import FLAVORS

        parallel_checks.check_before_model(job(seq_len=63, tensor_parallel_degree=2), compose(["adamw"], {}),
                                           FLAVORS["nano"], world=4)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "3"],
         r"parallelism\.data_parallel_shard_degree = 3 x .* = 6 but the world size is 4"),
        (["--parallelism.tensor_parallel_degree", "2"],
         r"tensor parallelism \(parallelism\.tensor_parallel_degree = 2\) is not supported with the "
         r"weight-parametrizing method\(s\) sltrain"),
    ],
    ids=["product", "tp-sltrain"],
)
def test_train_py_refuses_bad_degrees_before_the_model(tmp_path, args, expected):
    out_dir = tmp_path / "out"
    e = dict(env(), WORLD_SIZE="4")
    proc = subprocess.run(
        [sys.executable, "titan_integration/train.py", "--job.config_file", "plugins/sltrain.toml",
         "--model.flavor", "nano", "--sltrain.rank", "8", "--job.dump_folder", str(out_dir), *args],
        cwd=ROOT, env=e, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert re.search(expected, out), out[-3000:]
    assert "Building slimtrain_llama" not in out and "embedded corpus ready" not in out
    assert not out_dir.exists()


def _fake_checkpoint(folder, dp_ranks: int):
    """A DCP folder shaped like torchtitan's: a model tensor and one data-loader entry per dp rank."""
    import torch
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.zeros(2)},
             "dataloader": {f"dp_rank_{k}": torch.tensor([k]) for k in range(dp_ranks)}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def _ck_job(tmp_path, **ck):
    c = dict(enable=True, folder="checkpoint", load_step=-1, initial_load_path=None, initial_load_model_only=True,
             exclude_from_loading=[])
    c.update(ck)
    j = job(data_parallel_shard_degree=2)
    j.checkpoint = SimpleNamespace(**c)
    j.job = SimpleNamespace(dump_folder=str(tmp_path))
    return j


def test_a_checkpoint_of_another_data_parallel_size_is_refused_with_the_way_out(tmp_path):
    from slimtrain.registry import ConfigError
    from slimtrain.titan_integration import checkpoint_mesh

    _fake_checkpoint(tmp_path / "checkpoint" / "step-3", dp_ranks=4)
    assert checkpoint_mesh.saved_data_parallel_size(str(tmp_path / "checkpoint" / "step-3")) == 4
    with pytest.raises(ConfigError, match=r"written by 4 data-parallel ranks, this run has parallelism\."
                                          r"data_parallel_shard_degree x parallelism\.data_parallel_replicate_degree = "
                                          r"2 x 1 = 2: .*--checkpoint\.exclude_from_loading dataloader"):
        checkpoint_mesh.check_data_position(_ck_job(tmp_path), 2)
    checkpoint_mesh.check_data_position(_ck_job(tmp_path), 4)  # same size: loads
    checkpoint_mesh.check_data_position(_ck_job(tmp_path, exclude_from_loading=["dataloader"]), 2)
    # an initial checkpoint: refused only when it is loaded whole
    init = tmp_path / "other"
    _fake_checkpoint(init / "step-1", dp_ranks=4)
    other = dict(initial_load_path=str(init / "step-1"))
    checkpoint_mesh.check_data_position(_ck_job(init / "fresh", **other), 2)  # model only
    with pytest.raises(ConfigError, match="written by 4 data-parallel ranks"):
        checkpoint_mesh.check_data_position(_ck_job(init / "fresh", initial_load_model_only=False, **other), 2)
