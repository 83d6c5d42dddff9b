"""The shard writer (main process): a split's tokens appended to `.bin.tmp`, renamed to `.bin` when full."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ds_trainer.data.prepare.io_errors import _unwritable
from ds_trainer.errors import DsTrainerError


def _write_errors(method: Callable) -> Callable:
    """A _ShardWriter method whose OS errors (a full disk, a folder made read-only) become one-line errors."""

    @functools.wraps(method)
    def wrapper(self: _ShardWriter, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            # write() on a full disk names no file; the shard being filled is the one written.
            raise _unwritable(e.filename or self.tmp, e) from None

    return wrapper


class _ShardWriter:
    """Appends tokens to `{split}_{i:06d}.bin.tmp`; renames it to `.bin` when it holds `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, state: dict | None) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict] = list(state["shards"]) if state else []
        self.partial = int(state["partial_tokens"]) if state else 0
        self.fh = None
        self.sha = hashlib.sha256()
        self.max_id = -1
        self.commits = 0
        self._recover()

    def name(self, i: int) -> str:
        return f"{self.split}_{i:06d}.bin"

    @property
    def tmp(self) -> Path:
        return self.folder / (self.name(len(self.shards)) + ".tmp")

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.partial

    @_write_errors
    def _recover(self) -> None:
        for s in self.shards:
            p = self.folder / s["file"]
            if not p.is_file() or p.stat().st_size != 2 * s["tokens"]:
                raise DsTrainerError(
                    f"{p}: committed shard missing or of the wrong size; the folder was changed by hand; "
                    "use a new --out"
                )
        k = len(self.shards)
        tmp, final = self.tmp, self.folder / self.name(k)
        if self.partial:
            if not tmp.exists() and final.is_file():  # renamed after the last checkpoint: take it back
                os.replace(final, tmp)
            if not tmp.is_file() or tmp.stat().st_size < 2 * self.partial:
                raise DsTrainerError(
                    f"{tmp}: shorter than progress.json records; the folder was changed; use a new --out"
                )
            self.fh = open(tmp, "r+b")  # noqa: SIM115 - kept open while appending
            self.fh.truncate(2 * self.partial)
            data = np.frombuffer(self.fh.read(), dtype="<u2")
            self.sha.update(data)
            self.max_id = int(data.max()) if len(data) else -1
            self.fh.seek(0, os.SEEK_END)
        # Leftovers past the checkpoint (regenerated identically): stray .tmp files and uncommitted shards.
        for p in self.folder.glob(f"{self.split}_*.bin*"):
            m = re.fullmatch(rf"{self.split}_(\d{{6}})\.bin(\.tmp)?", p.name)
            if m and int(m.group(1)) >= k and p != tmp:
                p.unlink()

    @_write_errors
    def append(self, arr: np.ndarray) -> None:
        arr = arr.astype("<u2", copy=False)
        while len(arr):
            room = self.shard_tokens - self.partial
            chunk, arr = arr[:room], arr[room:]
            if self.fh is None:
                self.fh = open(self.tmp, "wb")  # noqa: SIM115 - kept open while appending
            self.fh.write(memoryview(chunk))
            self.sha.update(memoryview(chunk))
            self.max_id = max(self.max_id, int(chunk.max()))
            self.partial += len(chunk)
            if self.partial == self.shard_tokens:
                self._commit()

    @_write_errors
    def _commit(self) -> None:
        assert self.fh is not None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        name = self.name(len(self.shards))
        os.replace(self.tmp, self.folder / name)
        self.shards.append(
            {
                "file": name,
                "tokens": self.partial,
                "sha256": self.sha.hexdigest(),
                "max_token_id": self.max_id,
            }
        )
        self.sha, self.max_id, self.partial = hashlib.sha256(), -1, 0
        self.commits += 1

    @_write_errors
    def sync(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())

    @_write_errors
    def finish(self) -> None:
        if self.partial:
            self._commit()
        elif self.fh is not None:
            self.fh.close()
            self.fh = None
            self.tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Close after a failure: the error that stopped the run is the one to report, not a second one."""
        if self.fh is not None:
            with contextlib.suppress(OSError):
                self.fh.close()
            self.fh = None

    def state(self) -> dict:
        return {"shards": self.shards, "partial_tokens": self.partial}
