"""Work units (main process): the input cut into units of about `unit_bytes` bytes, in a fixed order."""

from __future__ import annotations

import gzip
import itertools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ds_trainer.data.prepare.cutting import (
    _file_cut_offsets,
    _file_line_ranges,
    _stream_line_chunks,
    _stream_txt_pieces,
)
from ds_trainer.data.prepare.inputs import InputFile, _gzip_error
from ds_trainer.data.prepare.io_errors import _reading


@dataclass(slots=True)
class _Unit:
    index: int
    kind: str  # "files": whole small files; "range": bytes [start, end) of one file; "data": bytes in hand
    file_idx: tuple[int, ...]
    nbytes: int  # input bytes (compressed for gzip), for the progress bar
    start: int = 0
    end: int = 0
    data: bytes | None = None
    first_line: int = 1  # line number of the unit's first line; 0 = unknown (a range of a JSONL file)
    piece: int = -1  # -1: whole documents; k >= 0: piece k of one long .txt document
    last: bool = True  # for a piece: the document ends in this unit


def _plan_units(files: list[InputFile], unit_bytes: int) -> Iterator[_Unit]:
    """The work units in their fixed global order (a function of the input bytes and unit_bytes only)."""
    index = 0
    batch: list[int] = []
    batch_bytes = 0

    def unit(kind: str, fis: tuple[int, ...], nbytes: int, **kw) -> _Unit:
        nonlocal index
        u = _Unit(index, kind, fis, nbytes, **kw)
        index += 1
        return u

    for fi, f in enumerate(files):
        if f.size == 0:  # reported (error, or warning and count) before the run starts
            continue
        small = f.size * 4 <= unit_bytes if f.gz else f.size <= unit_bytes
        if small:
            batch.append(fi)
            batch_bytes += f.size
            if batch_bytes >= unit_bytes or len(batch) >= 4096:
                yield unit("files", tuple(batch), batch_bytes)
                batch, batch_bytes = [], 0
            continue
        if batch:
            yield unit("files", tuple(batch), batch_bytes)
            batch, batch_bytes = [], 0
        if not f.gz:
            if f.fmt == "txt":
                cuts = _file_cut_offsets(f.path, f.size, unit_bytes)
                bounds = [0, *cuts, f.size]
                n = len(bounds) - 1
                for k in range(n):
                    a, b = bounds[k], bounds[k + 1]
                    yield unit(
                        "range", (fi,), b - a, start=a, end=b, piece=k if n > 1 else -1, last=k == n - 1
                    )
            else:
                for a, b in _file_line_ranges(f.path, f.size, unit_bytes):
                    yield unit("range", (fi,), b - a, start=a, end=b, first_line=0)
            continue
        yield from _gz_units(f, fi, unit_bytes, unit)
    if batch:
        yield unit("files", tuple(batch), batch_bytes)


def _gz_units(f: InputFile, fi: int, unit_bytes: int, unit: Callable[..., _Unit]) -> Iterator[_Unit]:
    with _reading(f.path):
        raw = open(f.path, "rb")  # noqa: SIM115 - closed by the with below
    with raw:
        gz = gzip.GzipFile(fileobj=raw)

        def read(n: int) -> bytes:
            try:
                return gz.read(n)
            except (OSError, EOFError, zlib.error) as e:
                raise _gzip_error(f.path, e) from None

        consumed = 0

        def took() -> int:
            nonlocal consumed
            pos = raw.tell()
            d, consumed = pos - consumed, pos
            return d

        if f.fmt == "txt":
            pieces = _stream_txt_pieces(read, unit_bytes)
            first = next(pieces)
            if first[1]:  # one piece: the whole document
                data = first[0]
                if data:
                    yield unit("data", (fi,), took(), data=data, start=0)
                else:
                    yield unit("files", (fi,), took())  # an empty .txt.gz: the worker reports it
                return
            offset = 0
            for k, (data, last) in enumerate(itertools.chain([first], pieces)):
                yield unit("data", (fi,), took(), data=data, start=offset, piece=k, last=last)
                offset += len(data)
        else:
            line = 1
            any_data = False
            for data in _stream_line_chunks(read, unit_bytes):
                any_data = True
                yield unit("data", (fi,), took(), data=data, first_line=line)
                line += data.count(b"\n")
            if not any_data:
                yield unit("files", (fi,), took())  # an empty .jsonl.gz: the worker reports it
