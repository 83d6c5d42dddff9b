"""OS errors of reading the inputs and writing --out: one-line DsTrainerErrors naming file and fix."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from ds_trainer.errors import DsTrainerError

# Running out of room: the fix is more room, after which the same command resumes.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _unreadable(path: str, e: OSError, role: str = "the inputs") -> DsTrainerError:
    return DsTrainerError(
        f"{path}: cannot be read ({_reason(e)}); make it a readable file, or leave it out of {role}"
    )


def _unwritable(path: str | Path, e: OSError) -> DsTrainerError:
    if e.errno in _NO_ROOM:
        fix = "free disk space (or raise the quota or file size limit), then rerun the same command to resume"
    else:
        fix = "make the --out folder writable and rerun the same command, or choose another --out"
    return DsTrainerError(f"{path}: cannot be written ({_reason(e)}); {fix}")


@contextlib.contextmanager
def _reading(path: str, role: str = "the inputs") -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _unreadable(path, e, role) from None


@contextlib.contextmanager
def _writing(path: str | Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _unwritable(e.filename or path, e) from None
