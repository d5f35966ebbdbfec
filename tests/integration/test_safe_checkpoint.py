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


# -- the gadget corpus, in every file a resume unpickles -------------------------------------------

import io  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

from tests.integration import gadget_pickles  # noqa: E402

GADGETS = gadget_pickles.corpus("MARKER")


def _gadgets(tmp_path, where: str):
    for i, g in enumerate(GADGETS):
        marker = tmp_path / f"{where}_{i}"
        yield [x for x in gadget_pickles.corpus(str(marker)) if x.name == g.name][0], marker


def _assert_none_ran(markers) -> None:
    time.sleep(0.3)  # Popen gadgets would create their marker asynchronously
    ran = [str(m) for m in markers if m.exists()]
    assert not ran, f"gadgets executed: {ran}"


def test_the_gadget_corpus_is_real_plain_pickle_runs_every_gadget(tmp_path):
    """Each gadget creates its marker under plain pickle: the refusals below are of real payloads."""
    assert len(GADGETS) >= 20
    markers = []
    for g, marker in _gadgets(tmp_path, "plain"):
        with gadget_pickles.extension_registered(g):
            try:
                pickle.loads(g.data)
            except Exception:
                pass  # e.g. a gadget whose callable returns something the next opcode rejects
        markers.append((g.name, marker))
    time.sleep(0.3)
    assert [name for name, m in markers if not m.exists()] == []


def test_every_gadget_in_dcp_metadata_is_refused_by_name(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    safe_checkpoint.install()
    folder = tmp_path / "ck"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    markers = []
    for g, marker in _gadgets(tmp_path, "metadata"):
        (folder / ".metadata").write_bytes(g.data)
        with gadget_pickles.extension_registered(g), pytest.raises(safe_checkpoint.UnsafeCheckpointError) as info:
            FileSystemReader(str(folder)).read_metadata()
        assert any(name in str(info.value) for name in g.refused), (g.name, str(info.value))
        assert ".metadata" in str(info.value)  # names the file
        markers.append(marker)
    _assert_none_ran(markers)


def test_every_gadget_in_the_dataloader_state_is_refused_by_name(tmp_path):
    from torchtitan.components.dataloader import ParallelAwareDataloader

    safe_checkpoint.install()
    loader = ParallelAwareDataloader(torch.utils.data.TensorDataset(torch.arange(4)), dp_rank=0, dp_world_size=1)
    good = loader.state_dict()
    loader.load_state_dict(good)  # a real state loads
    markers = []
    for g, marker in _gadgets(tmp_path, "dataloader"):
        with gadget_pickles.extension_registered(g), pytest.raises(safe_checkpoint.UnsafeCheckpointError) as info:
            loader.load_state_dict({"dp_rank_0": g.data, "world_size": 1})
        assert any(name in str(info.value) for name in g.refused), (g.name, str(info.value))
        markers.append(marker)
    _assert_none_ran(markers)


def test_every_gadget_as_a_dcp_bytes_value_is_refused(tmp_path):
    """Non-tensor values (step, scheduler, the dataloader's bytes) go through torch's weights_only
    loader; the refusal names the value."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    safe_checkpoint.install()
    planner = DefaultLoadPlanner()
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn="train_state"))
    markers = []
    for g, marker in _gadgets(tmp_path, "bytes"):
        with gadget_pickles.extension_registered(g), pytest.raises(safe_checkpoint.UnsafeCheckpointError) as info:
            planner.load_bytes(item, io.BytesIO(g.data))
        assert "train_state" in str(info.value), (g.name, str(info.value))
        markers.append(marker)
    _assert_none_ran(markers)


def test_metadata_naming_a_storage_file_outside_its_folder_is_refused(tmp_path):
    import dataclasses

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    safe_checkpoint.install()
    folder = tmp_path / "ck"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    meta = FileSystemReader(str(folder)).read_metadata()
    for key, info in meta.storage_data.items():
        meta.storage_data[key] = dataclasses.replace(info, relative_path="../../etc/passwd")
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(safe_checkpoint.UnsafeCheckpointError, match="outside its folder"):
        FileSystemReader(str(folder)).read_metadata()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_metadata_file_is_named_not_eof_or_memory_error(tmp_path, damage):
    """Without a checksum file (e.g. --checkpoint.initial_load_path), a damaged .metadata still
    names the file instead of a bare EOFError/MemoryError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    safe_checkpoint.install()
    folder = tmp_path / "ck"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    raw = bytearray((folder / ".metadata").read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # the frame length of the first FRAME opcode: pickle would try to allocate ~2**63 bytes
        raw[3:11] = b"\xff" * 7 + b"\x7f"
    (folder / ".metadata").write_bytes(bytes(raw))
    with pytest.raises(safe_checkpoint.DamagedCheckpointError, match=r"\.metadata is damaged or truncated"):
        FileSystemReader(str(folder)).read_metadata()
