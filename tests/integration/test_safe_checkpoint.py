"""Resuming never runs code from the checkpoint folder (titan_integration/safe_checkpoint.py)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from slimtrain.titan_integration import cpu_shim

cpu_shim.apply()

from slimtrain.titan_integration import safe_checkpoint  # noqa: E402


class Payload:
    """Unpickling this calls os.system: what a crafted checkpoint file would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_code_payload_naming_it(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"state": Payload(str(marker))})
    with pytest.raises(safe_checkpoint.UnsafeCheckpointError, match=r"(posix|os)\.system"):
        safe_checkpoint.restricted_loads(data)
    assert not marker.exists()
    pickle.loads(data)  # the payload is real: plain pickle runs it
    assert marker.exists()


def test_real_checkpoint_loads_through_the_restricted_loaders(tmp_path):
    import torch.distributed.checkpoint as dcp

    safe_checkpoint.install()
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "lrs": [0.1, 0.2], "blob": pickle.dumps({"a": 1})}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    loaded = {"w": torch.zeros(2, 3), "step": 0, "lrs": [], "blob": b""}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7 and loaded["lrs"] == [0.1, 0.2]
    assert safe_checkpoint.restricted_loads(loaded["blob"]) == {"a": 1}


def test_crafted_metadata_file_is_refused_on_resume(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    safe_checkpoint.install()
    folder = tmp_path / "ck"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(safe_checkpoint.UnsafeCheckpointError):
        FileSystemReader(str(folder)).read_metadata()
    assert not marker.exists()


def test_crafted_bytes_value_is_refused(tmp_path):
    """A non-tensor value (torch.save'd by DCP) that carries a payload: weights_only refuses it."""
    import torch.distributed.checkpoint as dcp

    safe_checkpoint.install()
    marker = tmp_path / "pwned"
    dcp.save({"x": Payload(str(marker))}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    assert not marker.exists()
    with pytest.raises(BaseException) as info:  # DCP's CheckpointException is a BaseException
        dcp.load({"x": None}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    # DCP wraps the per-rank error; its text names the refused global
    assert "system" in str(info.value) + repr(getattr(info.value, "failures", "")), str(info.value)[:2000]
    assert not marker.exists()
