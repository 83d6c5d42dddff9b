"""Input files: paths, folders and globs resolved into a sorted list of supported files; reading one whole."""

from __future__ import annotations

import glob
import gzip
import os
import stat
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ds_trainer.data.prepare.io_errors import _reading
from ds_trainer.errors import DsTrainerError

_SUFFIXES = {
    ".txt.gz": ("txt", True),
    ".jsonl.gz": ("jsonl", True),
    ".txt": ("txt", False),
    ".jsonl": ("jsonl", False),
}
_SUPPORTED = ".txt, .jsonl, .txt.gz or .jsonl.gz"


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    fmt: str  # "txt" or "jsonl"
    gz: bool
    size: int
    mtime_ns: int


def _kind(name: str) -> tuple[str, bool] | None:
    lower = name.lower()
    for suffix, kind in _SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


def _walk(folder: str) -> list[str]:
    """Supported files below `folder` (following no links to folders), sorted by path components."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, n) for n in names if _kind(n)]
    skip = len(os.path.join(folder, ""))
    return sorted(found, key=lambda f: f[skip:].split(os.sep))


def resolve_inputs(specs: Sequence[str | os.PathLike], what: str = "input") -> list[InputFile]:
    """Files named by paths, folders (every supported file below, sorted) and globs, in argument order.

    A file named twice (or reached twice) counts once, where it first appears.
    """
    files: list[InputFile] = []
    seen: set[tuple[int, int]] = set()
    for spec in specs:
        spec = str(spec)
        if os.path.isfile(spec):
            if _kind(os.path.basename(spec)) is None:
                raise DsTrainerError(f"{what} {spec}: unsupported file type; expected {_SUPPORTED}")
            found = [spec]
        elif os.path.isdir(spec):
            found = _walk(os.path.abspath(spec))
        else:
            matches = sorted(glob.glob(spec, recursive=True), key=lambda f: Path(f).parts)
            found = [f for f in matches if _kind(os.path.basename(f))]
            if not matches:
                raise DsTrainerError(
                    f"{what} {spec}: no such file or folder, and no file matches it as a glob"
                )
        n = len(files)
        for f in found:
            try:
                st = os.stat(f)
            except OSError as e:
                raise DsTrainerError(f"{what} {f}: cannot be read ({e.strerror})") from None
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            fmt, gz = _kind(os.path.basename(f))  # type: ignore[misc]
            files.append(InputFile(os.path.abspath(f), fmt, gz, st.st_size, st.st_mtime_ns))
        if len(files) == n and not found:
            where = "the folder holds" if os.path.isdir(spec) else "the glob matches"
            raise DsTrainerError(f"{what} {spec}: {where} no {_SUPPORTED} files")
    return files


def _gzip_error(path: str, e: Exception) -> DsTrainerError:
    return DsTrainerError(
        f"{path}: not a valid gzip file ({e}); replace it with a complete copy, or leave it out of the inputs"
    )


def _read_file_bytes(f: InputFile, role: str = "the inputs") -> bytes:
    with _reading(f.path, role), open(f.path, "rb") as fh:
        data = fh.read()
    if f.gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise _gzip_error(f.path, e) from None
    return data
