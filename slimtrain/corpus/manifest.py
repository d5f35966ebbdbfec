"""The ``manifest.json`` that describes (and vouches for) a prepared folder.

A manifest records what went in (sources, versions, artifact hashes, settings) and
what came out (file hashes; document, character and token counts per split).  It is
written last, inside the temporary folder, just before the folder is renamed into
place - so a folder with a valid manifest whose files still hash to the recorded
values is complete, and that is exactly the test for "nothing to do".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .sources import sha256_file

log = logging.getLogger("slimtrain.corpus")

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for the given files of ``folder``."""
    return {
        n: {"sha256": sha256_file(folder / n), "bytes": (folder / n).stat().st_size}
        for n in sorted(names)
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (Path(folder) / MANIFEST_FILE).write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_folder(folder: Path, settings: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``folder`` is a complete, intact preparation made with ``settings``.

    Returns ``(ok, reason)``; ``reason`` says what is missing or different.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False, f"{folder} does not exist"
    manifest = read_manifest(folder)
    if manifest is None:
        return False, f"{folder / MANIFEST_FILE} missing or unreadable"
    if manifest.get("format_version") != FORMAT_VERSION:
        return False, "manifest format version differs"
    if manifest.get("settings") != settings:
        return False, (
            f"settings differ (have {manifest.get('settings')}, want {settings})"
        )
    return verify_files(folder, manifest)


def verify_files(folder: Path, manifest: dict[str, Any], names: list[str] | None = None) -> tuple[bool, str]:
    """Whether the files the manifest records (or just ``names`` of them) are present with their
    recorded size and sha256. Returns ``(ok, reason)``; the reason names the file and both hashes,
    so a corrupted token file is reported as such instead of failing later as an index error."""
    files = manifest.get("files", {})
    for name in (sorted(files) if names is None else names):
        path = Path(folder) / name
        entry = files.get(name)
        if entry is None:
            return False, f"{path} is not recorded in {Path(folder) / MANIFEST_FILE}"
        if not path.is_file():
            return False, f"{path} missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return False, f"{path} has {size} bytes, its manifest records {entry['bytes']}"
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            return False, (f"{path} does not match its recorded hash (sha256 {digest[:16]}..., "
                           f"manifest {entry['sha256'][:16]}...)")
    return True, "complete"
