"""Atomic file writes: the project's one implementation (`thinkrl.fileio` re-exports it).

It lives in `rewards` because `rewards` imports nothing of the project's other packages (it is the plugin
contract, importable alone), while every other package may import `rewards`: so this is the one place
that both `rewards.score` and `thinkrl.fileio` (checkpoints, datasets, progress files) can reach.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary sibling file, fsync and a rename.

    A reader sees the old file or the complete new one, never a half-written one; a failure (or a kill)
    leaves the old file as it was. Missing parent folders are created.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (an image, a weights file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
