"""Bad GPU-path settings fail before a model is built, naming the setting (no torchrun needed; the
wiring through the training command is checked in test_gpu_path_compile.py)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from slimtrain.registry import ConfigError
from slimtrain.titan_integration import accelerator_checks as gpu_path


def _job(mode="none", option="2", compile_enable=False, param="bfloat16"):
    return NS(
        activation_checkpoint=NS(mode=mode, selective_ac_option=option),
        compile=NS(enable=compile_enable, backend="inductor"),
        training=NS(mixed_precision_param=param, mixed_precision_reduce="float32", dtype="float32"),
    )


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_supported_ac_modes_pass(mode):
    gpu_path.check_config(_job(mode=mode, option="op"), "cpu")
    gpu_path.check_config(_job(mode=mode, option="3"), "cpu")


@pytest.mark.parametrize("mode", ["memory_budget", "Selective", "everything"])
def test_other_ac_modes_are_refused_with_the_allowed_list(mode):
    with pytest.raises(ConfigError, match=rf"mode = '{mode}'.*allowed: none, selective, full"):
        gpu_path.check_config(_job(mode=mode), "cpu")


@pytest.mark.parametrize("option", ["0", "ops", "-1", ""])
def test_bad_selective_option_is_refused(option):
    with pytest.raises(ConfigError, match=rf"selective_ac_option = '{option}'.*'op'.*positive integer"):
        gpu_path.check_config(_job(mode="selective", option=option), "cpu")
    gpu_path.check_config(_job(mode="full", option=option), "cpu")  # only read in selective mode


def test_compile_without_dynamo_is_refused(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"--compile.enable: torch.compile is not supported by this torch"):
        gpu_path.check_config(_job(compile_enable=True), "cpu")
    gpu_path.check_config(_job(compile_enable=False), "cpu")  # only when asked for


def test_compile_on_gpu_without_triton_is_refused(monkeypatch):
    import torch.utils._triton as t

    monkeypatch.setattr(t, "has_triton", lambda: False)
    with pytest.raises(ConfigError, match="needs the `triton` package"):
        gpu_path.check_compile(NS(enable=True, backend="inductor"), "cuda")
    gpu_path.check_compile(NS(enable=True, backend="aot_eager"), "cuda")  # triton is inductor's need
    gpu_path.check_compile(NS(enable=True, backend="inductor"), "cpu")  # CPU inductor emits C++


def test_bf16_on_gpu_without_bf16_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "OldGPU")
    with pytest.raises(ConfigError, match=r"mixed_precision_param = 'bfloat16'.*OldGPU.*float32"):
        gpu_path.check_bf16(_job().training, "cuda")
    gpu_path.check_bf16(_job(param="float32").training, "cuda")


def test_bf16_on_a_cpu_torch_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(gpu_path, "_cpu_runs_bf16", lambda: "RuntimeError: no bf16 kernel")
    with pytest.raises(ConfigError, match=r"cannot compute bf16 on the CPU \(RuntimeError: no bf16 kernel\)"):
        gpu_path.check_bf16(_job().training, "cpu")
    gpu_path.check_bf16(_job(param="float32").training, "cpu")


def test_this_cpu_torch_computes_bf16():
    assert gpu_path._cpu_runs_bf16() == ""


def test_compile_counter_sees_recompiles_and_graph_breaks():
    """The counts that test_gpu_path_compile asserts to be zero can be non-zero (run_plan's counters)."""
    import torch

    from slimtrain.titan_integration import run_plan

    run_plan._watch_recompiles()
    run_plan._reset_compile_state()

    def f(x):
        y = x * 2
        print("graph break")
        return y + 1

    g = torch.compile(f, backend="eager")
    g(torch.ones(3))
    g(torch.ones(3, dtype=torch.float64))
    counts = run_plan._compile_counts()
    assert counts["recompiles"] >= 1 and any("dtype" in r or "float64" in r for r in counts["recompile_reasons"]), counts
    assert counts["graph_breaks"] >= 1, counts
    run_plan._reset_compile_state()
    assert run_plan._compile_counts()["recompiles"] == 0


def test_compile_on_cpu_without_a_cxx_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*no-such-compiler-xyz"):
        gpu_path.check_compile(NS(enable=True, backend="inductor"), "cpu")
    gpu_path.check_compile(NS(enable=True, backend="aot_eager"), "cpu")  # only inductor emits C++
    monkeypatch.delenv("CXX")
    if gpu_path.cpu_cxx() is not None:
        gpu_path.check_compile(NS(enable=True, backend="inductor"), "cpu")
