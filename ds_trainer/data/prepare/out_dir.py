"""The output folder: created or checked, locked; its JSON files written atomically; cleanup on failure."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from ds_trainer.atomic_io import fsync_dir, write_atomic
from ds_trainer.data.prepare.io_errors import _reason, _writing
from ds_trainer.data.shards import PROGRESS_FILE
from ds_trainer.errors import DsTrainerError

PROGRESS_FORMAT = "ds_trainer.prepare.progress.v1"
SPLITS = ("train", "val")


def _write_json_atomic(path: Path, obj: dict, indent: int | None = None) -> None:
    # dumps without indent: json's C encoder. The folder is synced once by the caller.
    text = json.dumps(obj, indent=indent) + "\n"
    with _writing(path):
        write_atomic(path, text, sync_dir=False)


def _metadata_intact(folder: Path, metas: dict) -> bool:
    """Whether both {split}.json files hold exactly `metas` (not missing, truncated or edited)."""
    for split in SPLITS:
        try:
            if json.loads((folder / f"{split}.json").read_text()) != metas[split]:
                return False
        except (OSError, ValueError):
            return False
    return True


def _write_metadata(folder: Path, metas: dict) -> None:
    # val first: a folder holding train.json is complete (ds_trainer.data.shards.is_prepared). Indented
    # for people, unless a long list of sources would make json's pure-Python indenting slow.
    indent = 1 if len(metas["train"]["sources"]) <= 1000 else None
    for split in ("val", "train"):
        _write_json_atomic(folder / f"{split}.json", metas[split], indent)
    fsync_dir(folder)


def _option_differences(old: dict, new: dict) -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            if k in ("inputs", "decontaminate"):
                diffs.append(f"{k} (files added, removed or modified)")
            else:
                diffs.append(f"{k} {old.get(k)!r} → {new.get(k)!r}")
    return ", ".join(diffs) or "the options fingerprint"


class _OutDir:
    """The output folder: created or checked, locked against a second concurrent preparation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.created = False

    def open(self) -> dict | None:
        """The progress.json found (None for a new or empty folder)."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise DsTrainerError(f"--out {p}: exists and is not a folder; choose another --out")
        if not p.exists():
            try:
                p.mkdir(parents=True)
            except OSError as e:
                raise DsTrainerError(
                    f"--out {p}: cannot create the folder ({_reason(e)}); choose another --out"
                ) from None
            self.created = True
        try:
            return self._lock_and_read()
        except BlockingIOError:
            raise DsTrainerError(f"--out {p}: another preparation is writing into this folder") from None
        except OSError as e:
            raise DsTrainerError(
                f"--out {p}: cannot be used ({_reason(e)}); make the folder readable and writable, "
                "or choose another --out"
            ) from None

    def _lock_and_read(self) -> dict | None:
        p = self.path
        try:
            import fcntl

            self.fd = os.open(p, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        progress = p / PROGRESS_FILE
        if progress.is_file():
            try:
                state = json.loads(progress.read_text())
            except ValueError as e:
                raise DsTrainerError(f"{progress}: unreadable ({e}); use a new --out") from None
            if not isinstance(state, dict):
                raise DsTrainerError(f"{progress}: not a preparation's progress record; use a new --out")
            return state
        if any(p.iterdir()):
            raise DsTrainerError(
                f"--out {p}: the folder is not empty and holds no {PROGRESS_FILE}, so it is no preparation "
                "to resume; refusing to write into it: choose an empty or new folder"
            )
        self.created = True
        return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _remove_our_files(folder: Path) -> None:
    progress = folder / PROGRESS_FILE
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(progress.read_text())
        if state.get("units_done"):
            return
    # Cleanup after a failure, perhaps on a full disk: whatever cannot be removed stays.
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            if re.fullmatch(r"(train|val)_\d{6}\.bin(\.tmp)?|\.?progress\.json(\.tmp)?", p.name):
                p.unlink(missing_ok=True)
        folder.rmdir()
