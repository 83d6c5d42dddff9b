"""Cut points: where a long .txt document is cut into pieces, and where a JSONL file is cut at line ends.

Why cleaning and tokenising the pieces separately gives the tokens of the whole: docs/data_preparation.md.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator

from ds_trainer.data.prepare.io_errors import _reading

# A safe cut: after "\n", with printable non-space ASCII before it and an ASCII letter after it.
_CUT_RE = re.compile(rb"[\x21-\x7e]\n(?=[A-Za-z])")


def cut_offsets(data: bytes, unit_bytes: int) -> list[int]:
    """Byte offsets at which a long text document is cut into pieces of about `unit_bytes` bytes.

    Each cut is the first safe point (see `_CUT_RE`) at least `unit_bytes` past the previous one, and
    never leaves a last piece under `unit_bytes // 4`. The cut bytes are ASCII, so the pieces are whole
    UTF-8 characters and decode (strictly or with replacement) exactly as the whole text does.
    """
    cuts: list[int] = []
    pos, n, tail = 0, len(data), unit_bytes // 4
    while n - pos > unit_bytes + tail:
        m = _CUT_RE.search(data, pos + unit_bytes - 1)
        if m is None or n - m.end() < tail:
            break
        pos = m.end()
        cuts.append(pos)
    return cuts


def _file_cut_offsets(path: str, size: int, unit_bytes: int) -> list[int]:
    """`cut_offsets` of a file's bytes, reading only small windows around the cut points."""
    cuts: list[int] = []
    pos, tail = 0, unit_bytes // 4
    with _reading(path), open(path, "rb") as fh:
        while size - pos > unit_bytes + tail:
            start, width = pos + unit_bytes - 1, 4096
            while True:
                fh.seek(start)
                window = fh.read(width)
                m = _CUT_RE.search(window)
                if m is not None or start + len(window) >= size:
                    break
                width *= 4
            if m is None or size - (start + m.end()) < tail:
                break
            pos = start + m.end()
            cuts.append(pos)
    return cuts


def _stream_txt_pieces(read: Callable[[int], bytes], unit_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """`cut_offsets` over a stream: (piece, is_last) without holding more than needed to find each cut."""
    buf = bytearray()
    eof = False
    tail = unit_bytes // 4

    def fill(n: int) -> None:
        nonlocal eof
        while not eof and len(buf) < n:
            chunk = read(1 << 20)
            if chunk:
                buf.extend(chunk)
            else:
                eof = True

    while True:
        fill(unit_bytes + tail + 1)
        cut = None
        if len(buf) > unit_bytes + tail:
            frm = unit_bytes - 1
            while True:
                m = _CUT_RE.search(buf, frm)
                if m is not None:
                    fill(m.end() + tail)
                    if len(buf) - m.end() >= tail:
                        cut = m.end()
                    break
                if eof:
                    break
                frm = max(frm, len(buf) - 2)
                fill(len(buf) + (1 << 20))
        if cut is None:
            fill(sys.maxsize)
            yield bytes(buf), True
            return
        yield bytes(buf[:cut]), False
        del buf[:cut]


def _stream_line_chunks(read: Callable[[int], bytes], unit_bytes: int) -> Iterator[bytes]:
    """Chunks of whole lines: each ends at the first "\\n" at or after byte `unit_bytes - 1`."""
    buf = bytearray()
    eof = False
    while True:
        frm = unit_bytes - 1
        while True:
            i = buf.find(b"\n", frm) if len(buf) > frm else -1
            if i >= 0 or eof:
                break
            frm = max(frm, len(buf))
            chunk = read(1 << 20)
            if chunk:
                buf.extend(chunk)
            else:
                eof = True
        if i < 0:
            if buf:
                yield bytes(buf)
            return
        yield bytes(buf[: i + 1])
        del buf[: i + 1]


def _file_line_ranges(path: str, size: int, unit_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of whole lines of about `unit_bytes` (as `_stream_line_chunks`), reading only near the cuts."""
    ranges = []
    pos = 0
    with _reading(path), open(path, "rb") as fh:
        while pos < size:
            start = pos + unit_bytes - 1
            end = size
            while start < size:
                fh.seek(start)
                window = fh.read(1 << 16)
                i = window.find(b"\n")
                if i >= 0:
                    end = start + i + 1
                    break
                start += len(window)
            ranges.append((pos, end))
            pos = end
    return ranges
