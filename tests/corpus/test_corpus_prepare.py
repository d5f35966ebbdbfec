"""prepare-data end to end on generated text: manifest, idempotence, skipping, atomicity."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from slimtrain.corpus import cli, prepare, sources
from slimtrain.corpus import tokenizer as tkn
from slimtrain.corpus.manifest import read_manifest
from slimtrain.corpus.sources import sha256_file

from .conftest import SETTINGS, SMALL_VOCAB
from .fakes import fake_source, fake_sources


def test_manifest_content(small_corpus):
    data_dir, result = small_corpus
    folder = result.path
    assert folder == data_dir / f"vocab-{SMALL_VOCAB}"
    m = read_manifest(folder)
    assert m == result.manifest
    assert m["vocab_size"] == SMALL_VOCAB
    assert [(s["name"], s["status"], s["version"]) for s in m["sources"]] == [
        ("alpha", "ok", "1.0"), ("beta", "ok", "1.0")]
    # every listed file exists and hashes as recorded
    assert set(m["files"]) == {"tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin"}
    for name, entry in m["files"].items():
        assert sha256_file(folder / name) == entry["sha256"]
    # counts per split agree with the files
    for split in ("train", "val"):
        s = m["splits"][split]
        tokens = np.fromfile(folder / s["file"], dtype=s["dtype"])
        assert s["tokens"] == tokens.size > 0
        lines = (data_dir / "text" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        docs = [json.loads(line) for line in lines]
        assert s["documents"] == len(docs) == int((tokens == 0).sum()) == int((tokens == 1).sum())
        assert s["characters"] == sum(len(d["text"]) for d in docs)
        per_source = sum(src["splits"][split]["documents"] for src in m["sources"])
        assert per_source == s["documents"]
    # the stub and the duplicate of each source were dropped
    for src in m["sources"]:
        assert src["dropped_near_empty"] >= 1 and src["dropped_duplicates"] >= 1
    assert m["cleaning"]["dropped_duplicates"] >= 2


def test_no_duplicates_and_no_boilerplate_in_output(small_corpus):
    data_dir, _ = small_corpus
    texts = []
    for split in ("train", "val"):
        for line in (data_dir / "text" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            texts.append(json.loads(line)["text"])
    assert len(texts) == len(set(texts))
    assert not any("Gutenberg" in t or "eBook" in t or "SPDX" in t for t in texts)


def test_second_run_does_nothing_and_says_so(small_corpus, caplog):
    data_dir, first = small_corpus
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    calls = []
    srcs = fake_sources()
    wrapped = [sources.Source(s.name, s.description, lambda w, f=s.fetch: calls.append(1) or f(w),
                              s.iter_raw) for s in srcs]
    with caplog.at_level(logging.INFO, logger="slimtrain.corpus"):
        again = prepare.prepare_corpus(data_dir, SMALL_VOCAB, sources=wrapped, settings=SETTINGS)
    assert not again.built and again.path == first.path
    assert calls == []  # nothing fetched
    assert {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()} == mtimes
    assert "nothing to do" in caplog.text


def test_cli_second_run_reports_nothing_to_do(small_corpus, monkeypatch, capsys):
    data_dir, _ = small_corpus
    monkeypatch.setattr(cli, "CorpusSettings",
                        lambda **kw: prepare.CorpusSettings(**{**kw, "val_fraction": 0.3}))
    monkeypatch.setattr(prepare, "default_sources", fake_sources)
    rc = cli.main(["--data-dir", str(data_dir), "--vocab-size", str(SMALL_VOCAB)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "nothing to do" in out and "train:" in out and "tokens" in out


def test_missing_source_is_skipped_with_message(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="slimtrain.corpus"):
        r = prepare.prepare_corpus(tmp_path, SMALL_VOCAB, sources=fake_sources(fail_second=True),
                                   settings=SETTINGS)
    assert "source beta is unavailable on this machine, skipping it" in caplog.text
    assert "simulated" in caplog.text
    status = {s["name"]: s for s in r.manifest["sources"]}
    assert status["alpha"]["status"] == "ok"
    assert status["beta"]["status"] == "skipped" and "simulated" in status["beta"]["reason"]
    assert r.manifest["splits"]["train"]["tokens"] > 0


def test_real_fetchers_failing_are_skipped_then_error(tmp_path, monkeypatch, caplog):
    # The real pip/apt fetchers, with every command failing as on an offline machine.
    def offline(cmd, cwd=None):
        raise sources.SourceUnavailable(f"`{cmd[0]}` failed: network unreachable (simulated)")

    monkeypatch.setattr(sources, "run_command", offline)
    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    with caplog.at_level(logging.WARNING, logger="slimtrain.corpus"):
        with pytest.raises(prepare.CorpusError, match="no source could be fetched"):
            prepare.prepare_corpus(tmp_path, SMALL_VOCAB, settings=SETTINGS)
    for name in ("shakespeare", "linux-doc", "python-doc"):
        assert f"source {name} is unavailable on this machine, skipping it" in caplog.text
    assert not (tmp_path / "text").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_returns_error_when_nothing_can_be_fetched(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "default_sources",
                        lambda: [fake_source("a", fail=True), fake_source("b", fail=True)])
    assert cli.main(["--data-dir", str(tmp_path), "--vocab-size", "300"]) == 1
    assert "no source could be fetched" in capsys.readouterr().err


def test_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("crash while tokenizing")

    monkeypatch.setattr(tkn, "encode_documents", boom)
    with pytest.raises(RuntimeError, match="crash"):
        prepare.prepare_corpus(tmp_path, SMALL_VOCAB, sources=fake_sources(), settings=SETTINGS)
    assert not (tmp_path / f"vocab-{SMALL_VOCAB}").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert read_manifest(tmp_path / "text") is not None  # the finished stage is kept
    monkeypatch.undo()
    r = prepare.prepare_corpus(tmp_path, SMALL_VOCAB, sources=fake_sources(), settings=SETTINGS)
    assert r.built and (r.path / "train.bin").is_file()


def test_rebuilds_when_settings_or_files_change(small_corpus, tmp_path):
    data_dir, first = small_corpus
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(data_dir, work)
    # a damaged token file is detected and rebuilt identically (determinism)
    (work / f"vocab-{SMALL_VOCAB}" / "val.bin").write_bytes(b"\0\0")
    r = prepare.prepare_corpus(work, SMALL_VOCAB, sources=fake_sources(), settings=SETTINGS)
    assert r.built
    for name, entry in first.manifest["files"].items():
        assert sha256_file(r.path / name) == entry["sha256"]
    # another vocab size gets its own folder, reusing the text stage
    text_mtime = (work / "text" / "train.jsonl").stat().st_mtime_ns
    r2 = prepare.prepare_corpus(work, 300, sources=fake_sources(), settings=SETTINGS)
    assert r2.path.name == "vocab-300" and r2.manifest["vocab_size"] == 300
    assert (work / "text" / "train.jsonl").stat().st_mtime_ns == text_mtime
    assert (work / f"vocab-{SMALL_VOCAB}" / "manifest.json").is_file()


def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMTRAIN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepare.default_data_dir() == tmp_path / "xdg" / "slimtrain" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert prepare.default_data_dir() == tmp_path / "home" / ".cache" / "slimtrain" / "data"
    monkeypatch.setenv("SLIMTRAIN_DATA_DIR", str(tmp_path / "env"))
    assert prepare.default_data_dir() == tmp_path / "env"


def test_ensure_corpus_uses_env_dir(small_corpus, monkeypatch):
    data_dir, first = small_corpus
    monkeypatch.setenv("SLIMTRAIN_DATA_DIR", str(data_dir))
    monkeypatch.setattr(prepare, "default_sources", fake_sources)
    monkeypatch.setattr(prepare, "CorpusSettings",
                        lambda **kw: SETTINGS if not kw else prepare.CorpusSettings(**kw))
    assert prepare.ensure_corpus(vocab_size=SMALL_VOCAB) == first.path


def test_cli_rejects_too_small_vocab_before_fetching(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "default_sources",
                        lambda: pytest.fail("must not fetch for an invalid vocab size"))
    with pytest.raises(SystemExit) as info:  # argparse's usage error, before anything runs
        cli.main(["--data-dir", str(tmp_path), "--vocab-size", "100"])
    assert info.value.code == 2
    assert "argument --vocab-size: 100: allowed: an integer >= 258" in capsys.readouterr().err


def test_disk_full_names_the_path_and_free_space_and_keeps_nothing_half_written(tmp_path, monkeypatch):
    import errno

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(prepare, "write_manifest", full)
    with pytest.raises(prepare.CorpusError) as info:
        prepare.prepare_corpus(tmp_path, SMALL_VOCAB, sources=fake_sources(), settings=SETTINGS)
    message = str(info.value)
    assert "disk full while writing" in message and str(tmp_path) in message and "MiB free there" in message
    assert not (tmp_path / "text").exists() and not list(tmp_path.glob(".tmp-*"))


def test_a_data_dir_that_is_a_file_is_named(tmp_path, capsys):
    target = tmp_path / "data"
    target.write_text("not a folder")
    assert cli.main(["--data-dir", str(target)]) == 1
    assert f"data dir {target} is a file, not a folder" in capsys.readouterr().err
