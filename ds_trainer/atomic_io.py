"""Crash-safe file writes: a reader sees the old content or the new, never a mix, even after a crash."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (some filesystems refuse: nothing to do there)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_path(path: Path, writer: str = "") -> Path:
    """Where write_atomic writes before the rename (a crash may leave it; the next write replaces it)."""
    return path.with_name(f".{path.name}{writer}.tmp")


def write_atomic(
    path: Path,
    text: str,
    sync_dir: bool = True,
    before_replace: Callable[[], None] | None = None,
    shared: bool = False,
) -> None:
    """Write to a temporary name, fsync, rename over `path`. `before_replace` runs between the two
    (failure drills kill the process there). `shared`: several processes or threads may write `path` at
    once (a search's workers), so each writes its own temporary file and the last rename wins."""
    tmp = temporary_path(path, f".{os.getpid()}.{threading.get_ident()}" if shared else "")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)
