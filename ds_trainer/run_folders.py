"""The run's folders, checked before the process group exists: a folder that cannot be made or written
would otherwise fail the first save, after the run has started."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ds_trainer.config import RunConfig


def writable_folder_problem(folder: Path | str, key: str, shown: Any = None) -> str | None:
    """Why `folder` cannot be created and written in, or None. Leaves nothing behind: the folder itself is
    made later by the code that writes there."""
    shown = folder if shown is None else shown
    probe = Path(folder).absolute()
    try:
        while not probe.exists() and not probe.is_symlink():
            probe = probe.parent  # the deepest part that exists; "/" always does
        if not probe.is_dir():
            what = "a broken symbolic link" if probe.is_symlink() else "a file"
            return f"{key}={shown} cannot be created: {probe} is {what}; choose another folder"
        os.rmdir(tempfile.mkdtemp(prefix=".ds_trainer_probe_", dir=probe))  # as the checkpointer will mkdir
    except OSError as e:
        return f"{key}={shown} cannot be created or written ({e.strerror or e} in {probe}); choose a folder you can write to"
    return None


def folder_problems(run: RunConfig, rank: int) -> list[str]:
    """checkpoint.dir on every rank (each writes there); metrics paths set explicitly on rank 0, the only
    rank that writes them (by default they are inside checkpoint.dir)."""
    found = [writable_folder_problem(run.run_dir, "checkpoint.dir")]
    if rank == 0 and run.log.tensorboard_dir:
        found.append(writable_folder_problem(run.log.tensorboard_dir, "log.tensorboard_dir"))
    if rank == 0 and run.log.jsonl:
        found.append(writable_folder_problem(Path(run.log.jsonl).parent, "log.jsonl", run.log.jsonl))
    return [p for p in found if p]
