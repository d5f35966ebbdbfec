"""Checksums of every checkpoint file: written after the files at save, verified before a load.

Why: torchtitan 0.2.2 loads whatever bytes a checkpoint folder holds. One flipped byte in a
``.distcp`` file loaded silently (the run diverged at the next step), a truncated file failed with
``EOFError`` naming no file, a flipped ``.metadata`` byte with an empty ``MemoryError``, and a save
interrupted after ``.metadata`` was written was taken for a good checkpoint.

So: after every save, rank 0 (the one that writes ``.metadata``, after every rank's files are
written) records the size and SHA-256 of every file of the step folder in ``CHECKSUM_FILE``,
written to a temporary name, fsynced and renamed (atomic on POSIX). A folder without it is a save
that did not finish. Before any byte of a checkpoint is unpickled, the load verifies every listed
file; a problem is reported by ``verify`` naming the file. What to do then (fall back to the
previous checkpoint or stop) is the caller's choice (``[slimtrain] checkpoint_on_damage``).

A checksum is integrity, not authenticity: whoever writes a checkpoint can write a matching
checksum file; safe_checkpoint.py is what keeps a crafted checkpoint from running code.
Plain Python (no torch, no torchtitan), so it is testable on its own.
"""

from __future__ import annotations

import hashlib
import json
import os

from slimtrain.disk_space import write_failed_message

CHECKSUM_FILE = "slimtrain_checksums.json"
FORMAT = 1
_CHUNK = 1 << 20


class CheckpointSaveError(OSError):
    """Writing a checkpoint's files failed (disk full, ...); the folder is not a checkpoint."""


def _sha256(path: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if not rel.startswith(CHECKSUM_FILE):
                out.append(rel)
    return sorted(out)


def remove_checksums(folder: str) -> None:
    """Before a save into ``folder`` (a step folder written again after a fallback): the folder
    stops counting as a checkpoint until the new checksums are written."""
    try:
        os.remove(os.path.join(folder, CHECKSUM_FILE))
    except FileNotFoundError:
        pass


def write_checksums(folder: str) -> str:
    """Record every file of ``folder`` in ``CHECKSUM_FILE`` atomically; returns its path. A write
    that fails (disk full) removes the temporary file and raises CheckpointSaveError naming the path
    and the free space: the folder is then not taken for a checkpoint."""
    entries = {}
    for rel in _files(folder):
        size, digest = _sha256(os.path.join(folder, rel))
        entries[rel] = {"bytes": size, "sha256": digest}
    path = os.path.join(folder, CHECKSUM_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "algorithm": "sha256", "files": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointSaveError(f"checkpoint not saved: {write_failed_message(path, exc)}") from None
    return path


def verify(folder: str) -> str | None:
    """None if every file listed in ``folder``'s checksum file is there with its size and hash;
    otherwise what is wrong, naming the file. A missing checksum file returns ``MISSING``."""
    path = os.path.join(folder, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return MISSING
    try:
        with open(path) as f:
            record = json.load(f)
        files = record["files"]
        if record.get("format") != FORMAT or record.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"{path} is damaged ({exc})"
    if ".metadata" not in files:
        return f"{path} does not list .metadata"
    for rel, expected in sorted(files.items()):
        if os.path.isabs(rel) or ".." in rel.split(os.sep):
            return f"{path} lists {rel!r}, outside the checkpoint folder"
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            return f"{file} is missing (listed in {CHECKSUM_FILE})"
        try:
            size, digest = _sha256(file)
        except OSError as exc:
            return f"{file} cannot be read ({exc.strerror or exc})"
        if size != expected.get("bytes"):
            return f"{file} has {size} bytes, {expected.get('bytes')} were written (truncated or overwritten)"
        if digest != expected.get("sha256"):
            return f"{file} is damaged: its SHA-256 differs from the one recorded at save"
    return None


MISSING = "no checksum file"
