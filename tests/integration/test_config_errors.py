"""A configuration error is one message naming the key, without a Python traceback, exit status 2
(titan_integration/train.py); the checks themselves are unit_checks.py's
check_bad_settings_are_refused_before_the_model."""

from __future__ import annotations

import pytest

from .helpers import _free_port, python

pytestmark = pytest.mark.integration


def test_a_config_error_is_one_message_without_traceback(tmp_path):
    out_dir = tmp_path / "out"
    proc = python("titan_integration/train.py", [
        "--job.config_file", "plugins/sltrain.toml", "--model.flavor", "nano", "--optimizer.lr", "-0.001",
        "--job.dump_folder", str(out_dir)], timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "slimtrain: error: [optimizer] lr = -0.001: allowed: a finite number > 0" in proc.stderr, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "Building slimtrain_llama" not in out and not out_dir.exists()


def test_methods_given_twice_is_refused_before_torchtitan(tmp_path):
    # through `slimtrain train`, the launcher that leaves out torchrun's ChildFailedError report
    proc = python("-m", ["slimtrain", "train", "--nproc-per-node", "1", "--master-port", str(_free_port()),
        "--job.config_file", "plugins/sltrain.toml", "--slimtrain.methods", "sltrain",
        "--slimtrain.methods", "low_rank", "--job.dump_folder", str(tmp_path / "out")], timeout=180)
    assert proc.returncode == 2
    assert "slimtrain: error: --slimtrain.methods given 2 times" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "ChildFailedError" not in proc.stderr
    assert "failed (exitcode" not in proc.stderr
