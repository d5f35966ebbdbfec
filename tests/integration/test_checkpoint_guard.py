"""A checkpoint carries its recipe and the checksums of its files (titan_integration/checkpoint_guard.py):
a damaged file is named and stops the run or falls back, an interrupted save is skipped, and a
resume under another recipe is refused listing the differences unless --slimtrain.resume_weights_only."""

from __future__ import annotations

import json
import shutil

import pytest

from slimtrain.titan_integration import checkpoint_integrity as integrity
from slimtrain.titan_integration import checkpoint_recipe, cpu_shim

cpu_shim.apply()

from slimtrain.titan_integration import safe_checkpoint  # noqa: E402

from .helpers import offline_args, read_log, run_many

pytestmark = pytest.mark.integration

SLTRAIN = ["--job.config_file", "plugins/sltrain.toml", "--sltrain.rank", "8", "--checkpoint.interval", "1"]


def test_damage_interrupted_saves_and_recipe_changes_on_resume(offline_assets, tmp_path):
    base = [*offline_args(offline_assets), *SLTRAIN, "--validation.no-enable"]
    a, b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = run_many(1, [{"name": "a", "args": [*base, "--training.steps", "2", "--job.dump_folder", str(a)]}],
                     tmp_path / "first")
    assert first["a"]["ok"], first
    shutil.copytree(a, b)  # an intact copy for the recipe checks
    ck = a / "checkpoint"
    for step in (1, 2):
        assert integrity.verify(str(ck / f"step-{step}")) is None
        saved = checkpoint_recipe.read_recipe(str(ck / f"step-{step}"))
        assert saved["methods"] == ["sltrain", "adamw"] and saved["settings"]["sltrain"]["rank"] == 8
        assert saved["flavor"] == "nano"
    # every global a fresh torchtitan checkpoint's .metadata references is on the exact allowlist
    assert _metadata_globals(ck / "step-2") <= safe_checkpoint.METADATA_GLOBALS
    # a save interrupted before its checksums (newest), and one flipped byte in step 2's data
    shutil.copytree(ck / "step-2", ck / "step-3")
    (ck / "step-3" / integrity.CHECKSUM_FILE).unlink()
    data = ck / "step-2" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))

    log_a = tmp_path / "a.jsonl"
    second = run_many(1, [
        {"name": "stop", "args": [*base, "--training.steps", "4", "--job.dump_folder", str(a)]},
        {"name": "fallback", "args": [*base, "--training.steps", "3", "--job.dump_folder", str(a),
                                      "--slimtrain.checkpoint_on_damage", "fallback",
                                      "--slimtrain.loss_log", str(log_a)]},
        {"name": "other_recipe", "args": [*base, "--slimtrain.methods", "low_rank", "--low_rank.rank", "8",
                                          "--training.steps", "4", "--job.dump_folder", str(b)]},
        {"name": "weights_only", "args": [*base, "--slimtrain.methods", "low_rank", "--low_rank.rank", "8",
                                          "--training.steps", "1", "--job.dump_folder", str(b),
                                          "--slimtrain.resume_weights_only"]},
    ], tmp_path / "second")
    log = (tmp_path / "second" / "run_many.log").read_text()

    assert "step-3 has no slimtrain_checksums.json" in log and "skipped" in log
    stop = second["stop"]
    assert not stop["ok"] and "CheckpointDamagedError" in stop["error"], stop
    assert "__0_0.distcp" in stop["error"] and "step-2" in stop["error"], stop["error"]

    assert second["fallback"]["ok"], second["fallback"]["error"]
    assert "falling back to the previous checkpoint" in log
    assert [e["step"] for e in read_log(log_a)[0]] == [2, 3]  # resumed from step 1
    assert integrity.verify(str(ck / "step-2")) is None  # written again, with fresh checksums

    other = second["other_recipe"]
    assert not other["ok"] and "RecipeMismatchError" in other["error"], other
    assert "[slimtrain] methods: ['sltrain', 'adamw'] in the checkpoint, ['low_rank', 'adamw'] now" in other["error"]
    assert "method 'sltrain' of the checkpoint is not in this run" in other["error"]
    assert "--slimtrain.resume_weights_only" in other["error"]

    assert second["weights_only"]["ok"], second["weights_only"]["error"]
    assert "DROPPED from the checkpoint" in log and "original2" in log.split("DROPPED from the checkpoint")[1][:3000]


def _metadata_globals(folder) -> set[tuple[str, str]]:
    """The globals ``.metadata`` references, recorded by an unpickler that resolves everything
    (the file is one this test's own run just wrote)."""
    import io
    import pickle

    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO((folder / ".metadata").read_bytes())).load()
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in seen
    return seen


def test_verify_names_truncated_flipped_and_missing_files(tmp_path):
    folder = tmp_path / "step-1"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"metadata" * 10)
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    assert integrity.verify(str(folder)) == integrity.MISSING
    integrity.write_checksums(str(folder))
    assert integrity.verify(str(folder)) is None
    data = (folder / "__0_0.distcp").read_bytes()

    (folder / "__0_0.distcp").write_bytes(data[:-7])
    assert "__0_0.distcp has 1017 bytes, 1024 were written" in integrity.verify(str(folder))
    flipped = bytearray(data)
    flipped[3] ^= 0x80
    (folder / "__0_0.distcp").write_bytes(bytes(flipped))
    assert "__0_0.distcp is damaged" in integrity.verify(str(folder))
    (folder / "__0_0.distcp").unlink()
    assert "__0_0.distcp is missing" in integrity.verify(str(folder))
    (folder / "__0_0.distcp").write_bytes(data)
    meta = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(meta[:5] + b"X" + meta[6:])
    assert ".metadata is damaged" in integrity.verify(str(folder))
    (folder / ".metadata").write_bytes(meta)
    (folder / integrity.CHECKSUM_FILE).write_text("{not json")
    assert "slimtrain_checksums.json is damaged" in integrity.verify(str(folder))


def test_recipe_differences_list_every_change():
    saved = {"flavor": "nano", "methods": ["sltrain", "momentum_reset"], "optimizer": "adamw",
             "settings": {"sltrain": {"rank": 8, "delta": 0.03}, "momentum_reset": {"every": 2}}}
    same = json.loads(json.dumps(saved))
    assert checkpoint_recipe.differences(saved, same) == []
    now = {"flavor": "tiny", "methods": ["sltrain"], "optimizer": "galore",
           "settings": {"sltrain": {"rank": 8, "delta": 0.05}}}
    diff = checkpoint_recipe.differences(saved, now)
    assert diff == [
        "[model] flavor: 'nano' in the checkpoint, 'tiny' now",
        "[slimtrain] methods: ['sltrain', 'momentum_reset'] in the checkpoint, ['sltrain'] now",
        "[sltrain] delta: 0.03 in the checkpoint, 0.05 now",
        "method 'momentum_reset' of the checkpoint is not in this run (its weights and state would be dropped)",
        "optimizer method: 'adamw' in the checkpoint, 'galore' now",
    ]
    assert "records no recipe" in checkpoint_recipe.differences(None, now)[0]


def _guarded_checkpointer(folder, on_damage="stop"):
    """The two methods checkpoint_guard wraps, over plain DCP (no trainer needed)."""
    import types

    import torch.distributed.checkpoint as dcp

    from slimtrain.titan_integration import checkpoint_guard

    ck = types.SimpleNamespace(enable=True, folder=str(folder))
    ck.dcp_save = lambda state, checkpoint_id, *a, **k: dcp.save(state, checkpoint_id=checkpoint_id, no_dist=True)
    ck.loaded = []
    ck.load = lambda step=-1: ck.loaded.append(step) or True
    ck._create_checkpoint_id = lambda step: str(folder / f"step-{step}")
    recipe = {"flavor": "nano", "methods": ["adamw"], "settings": {}, "optimizer": "adamw"}
    checkpoint_guard.install(ck, recipe, on_damage)
    return ck


@pytest.mark.parametrize("where", ["data", "checksums"])
def test_disk_full_during_a_save_names_the_path_and_leaves_no_checkpoint(tmp_path, monkeypatch, where):
    import errno

    import torch
    import torch.distributed.checkpoint.filesystem as dcp_fs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    ck = _guarded_checkpointer(tmp_path)
    ck.dcp_save({"w": torch.ones(4)}, str(tmp_path / "step-1"))  # a good one first
    assert integrity.verify(str(tmp_path / "step-1")) is None
    if where == "data":
        monkeypatch.setattr(dcp_fs, "_write_item", full)
    else:
        monkeypatch.setattr(integrity.json, "dump", full)
    with pytest.raises(integrity.CheckpointSaveError) as info:
        ck.dcp_save({"w": torch.ones(4)}, str(tmp_path / "step-2"))
    message = str(info.value)
    assert "disk full while writing" in message and "step-2" in message and "MiB free there" in message, message
    assert integrity.verify(str(tmp_path / "step-2")) == integrity.MISSING  # never taken for a checkpoint
    assert not list((tmp_path / "step-2").glob("*.tmp*"))
    monkeypatch.undo()
    assert ck.load() is True and ck.loaded == [1]  # the resume skips step-2 and loads step-1


def test_a_nan_setting_equals_itself():
    rec = {"flavor": "nano", "methods": ["m"], "optimizer": "adamw", "settings": {"m": {"x": float("nan")}}}
    assert checkpoint_recipe.differences(json.loads(json.dumps(rec)), rec) == []


def test_a_folder_with_no_intact_checkpoint_stops_unless_fallback(tmp_path):
    import torch

    ck = _guarded_checkpointer(tmp_path)
    ck.dcp_save({"w": torch.ones(4)}, str(tmp_path / "step-1"))
    (tmp_path / "step-1" / integrity.CHECKSUM_FILE).unlink()  # as if written before checksums existed
    from slimtrain.titan_integration import checkpoint_guard

    with pytest.raises(checkpoint_guard.CheckpointDamagedError, match="no intact checkpoint .* Stopping rather"):
        ck.load()
    assert ck.loaded == []
    fallback = _guarded_checkpointer(tmp_path, on_damage="fallback")
    assert fallback.load() is False and fallback.loaded == []  # starts at step 1
