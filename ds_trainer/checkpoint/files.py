"""A run folder's checkpoint files: names, the manifest, the commit protocol, verification and retention.

A save goes to `.partial-step_N/`; once every rank has written its files, rank 0 adds `manifest.json`
(every file with its size and CRC-32), renames the folder to `step_N/` and atomically replaces `latest`.
A crash at any moment therefore leaves either the previous checkpoint or the new one as the newest
committed folder, never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

from ds_trainer.atomic_io import fsync_dir, write_atomic
from ds_trainer.errors import DsTrainerError

LATEST = "latest"
MANIFEST = "manifest.json"
PARTIAL = ".partial-"
DELETING = ".deleting-"
UNIVERSAL_SUFFIX = "_universal"
TAG_RE = re.compile(r"^step_(\d{8,})$")
VERIFY_MODES = ("checksum", "size")
BYTES_PER_PARAMETER_ESTIMATE = 16  # fp32 weights + Adam's two moments + a master copy: the first save's guess
FREE_SPACE_MARGIN = 1.1


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def tag_named(name: str) -> str | None:
    """The checkpoint tag a user names: `step_00000060` as it is, or a step number like `60`; None if neither."""
    if TAG_RE.match(name):
        return name
    return tag_for_step(int(name)) if name.isdigit() else None


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def latest_tag(run_dir: Path) -> str | None:
    """What `latest` names (export reads it; resume trusts the folders instead)."""
    f = run_dir / LATEST
    return f.read_text().strip() if f.is_file() else None


def crc32_of(path: Path, chunk: int = 1 << 23) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def verify(folder: Path, checksums: bool, only: Callable[[int], bool] = lambda i: True) -> str | None:
    """Why `folder` is not a usable checkpoint, or None if it is.

    Presence and sizes are checked for every file; CRC-32s (a full read) only with `checksums`, and
    only for the files whose index passes `only`, so ranks can share that work.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (the save never finished)"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest"
    for i, (name, want) in enumerate(sorted(files.items())):
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{name} has {size:,} bytes, the manifest says {want['size']:,}"
        if checksums and only(i) and crc32_of(p) != want["crc32"]:
            return f"{name} does not match its checksum"
    return None


def committed(run_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every committed-looking checkpoint folder, newest first."""
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name) for p in run_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))
    ]
    return sorted(found, reverse=True)


def folder_bytes(folder: Path) -> int:
    try:
        return sum(f["size"] for f in json.loads((folder / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def check_free_space(path: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise DsTrainerError(
            f"not enough disk space for {what} in {path}: need about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free; free space there, point checkpoint.dir elsewhere, "
            "or lower checkpoint.keep_last"
        )


def write_manifest(folder: Path, checksums: dict[str, str]) -> None:
    files = {n: {"size": (folder / n).stat().st_size, "crc32": checksums[n]} for n in sorted(checksums)}
    for n in files:  # the data reaches the disk before the manifest that vouches for it
        with open(folder / n, "rb") as f:
            os.fsync(f.fileno())
    write_atomic(folder / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def commit(partial: Path, final: Path, fault: Callable[[str], None]) -> None:
    """The rename is the commit: resume takes the newest committed folder, whatever `latest` says.
    `fault(point)` runs at each point a failure drill may kill the process."""
    if final.exists():  # the same step saved again (a rerun after a resume): the new one wins
        remove(final)
    os.rename(partial, final)
    fsync_dir(final.parent)
    fault("kill_after_rename")
    write_atomic(final.parent / LATEST, final.name, before_replace=lambda: fault("kill_in_latest"))


def remove(folder: Path) -> None:
    """Renamed first: a crash mid-delete leaves a folder that resume never considers."""
    doomed = folder.with_name(DELETING + folder.name)
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep(run_dir: Path) -> None:
    """Remove the folders an interrupted save or prune left behind."""
    for p in run_dir.iterdir():
        if p.is_dir() and p.name.startswith((PARTIAL, DELETING)):
            shutil.rmtree(p, ignore_errors=True)


def to_keep(steps: list[int], keep_last: int, keep_every: int, protected: set[int]) -> set[int]:
    """Retention: the newest `keep_last` (0: all), every multiple of `keep_every`, and `protected`."""
    newest = sorted(steps, reverse=True)
    keep = set(newest if keep_last <= 0 else newest[:keep_last])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep | (protected & set(steps))


def prune(run_dir: Path, keep_last: int, keep_every: int, protected: set[int]) -> None:
    steps = [s for s, _ in committed(run_dir)]
    keep = to_keep(steps, keep_last, keep_every, protected)
    for s in steps:
        if s in keep:
            continue
        tag = tag_for_step(s)
        for name in (tag, tag + UNIVERSAL_SUFFIX):
            if (run_dir / name).exists():
                remove(run_dir / name)
