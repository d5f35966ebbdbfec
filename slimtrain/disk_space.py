"""Messages for writes that fail for lack of space: the path and the free space of its file system.

Why: a full disk surfaced as ``unexpected pos 704 vs 598`` (a checkpoint) or a bare OSError in the
middle of the corpus preparation; the user needs to know which path and how much room is left.
Plain Python, shared by the checkpoint guard and the corpus preparation.
"""

from __future__ import annotations

import errno
import os
import shutil

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_space(path: str | os.PathLike) -> str:
    """The free space of the file system holding ``path`` (or its nearest existing parent)."""
    probe = os.path.abspath(os.fspath(path))
    while probe and not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:,.1f} MiB free there"
    except OSError:
        return "free space unknown"


def write_failed_message(path: str | os.PathLike, exc: OSError) -> str:
    """``disk full while writing PATH (N MiB free there)``, or the OS's reason for other errors."""
    target = exc.filename or path
    reason = "disk full" if exc.errno in NO_SPACE else (exc.strerror or str(exc))
    return f"{reason} while writing {target} ({free_space(target)})"
