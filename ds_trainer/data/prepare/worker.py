"""Worker side: one work unit read, decoded, and its documents cleaned, hashed, checked and tokenised."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from ds_trainer.data.prepare.cleaning import _combine_digests, _digest, clean_text
from ds_trainer.data.prepare.cutting import cut_offsets
from ds_trainer.data.prepare.decontamination import _EvalNgrams, _has_ngram, _words
from ds_trainer.data.prepare.inputs import InputFile, _read_file_bytes
from ds_trainer.data.prepare.io_errors import _reading
from ds_trainer.data.prepare.options import PrepareOptions
from ds_trainer.data.prepare.units import _Unit
from ds_trainer.tokenizer import EOT_ID, get_encoding

# Test hook: seconds each worker sleeps per work unit, to make a preparation slow enough to be killed
# midway in tests/test_prepare.py. Not an option for users.
SLOW_UNITS_ENV = "DS_TRAINER_PREPARE_SLOW_UNITS"


@dataclass(slots=True)
class _Part:
    """One document, or one piece of a long document, as a worker saw it."""

    file_idx: int
    piece: int
    last: bool
    chars: int
    digest: bytes
    ntokens: int  # its tokens in the unit's token array, the EOT included when the document ends here
    blank: bool  # nothing but whitespace
    invalid: bool  # had invalid UTF-8 (replaced; or with --invalid_utf8 skip, not decoded at all)
    normalized: bool
    control_removed: int
    surrogates: bool
    contaminated: bool
    head: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()


@dataclass(slots=True)
class _Event:
    kind: str  # "bad_record", "empty_file", "invalid_utf8"
    file_idx: int
    line: int | None  # 1-based line within the unit's data (JSONL)
    offset: int | None  # byte offset in the file (.txt)
    message: str
    fatal: bool


@dataclass(slots=True)
class _Result:
    index: int
    parts: list[_Part] = field(default_factory=list)
    tokens: np.ndarray | None = None
    events: list[_Event] = field(default_factory=list)


@dataclass
class _Ctx:
    files: list[InputFile]
    opts: PrepareOptions
    eval: _EvalNgrams | None
    slow: float


_CTX: _Ctx | None = None


def _init_worker(ctx: _Ctx, parent_pid: int | None) -> None:
    global _CTX
    _CTX = ctx
    get_encoding()
    if parent_pid is not None:  # a real worker process
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
        with contextlib.suppress(Exception):  # Linux: die with the main process, even on SIGKILL
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:
            os._exit(1)


def _process_unit(unit: _Unit, tokenize: bool) -> _Result:
    ctx = _CTX
    assert ctx is not None
    if ctx.slow:
        time.sleep(ctx.slow)
    w = _UnitWork(ctx, unit, tokenize)
    w.run()
    return w.result()


class _UnitWork:
    def __init__(self, ctx: _Ctx, unit: _Unit, tokenize: bool) -> None:
        self.ctx, self.opts, self.unit, self.tokenize = ctx, ctx.opts, unit, tokenize
        self.res = _Result(unit.index)
        self.token_arrays: list[np.ndarray] = []
        self.fatal = False

    def result(self) -> _Result:
        if self.token_arrays:
            self.res.tokens = np.concatenate(self.token_arrays).astype("<u2", copy=False)
        return self.res

    def event(self, kind: str, fi: int, message: str, *, line=None, offset=None, fatal=False) -> None:
        self.res.events.append(_Event(kind, fi, line, offset, message, fatal))
        self.fatal = self.fatal or fatal

    def run(self) -> None:
        u = self.unit
        if u.kind == "files":
            for fi in u.file_idx:
                f = self.ctx.files[fi]
                data = _read_file_bytes(f)
                if not data:
                    self.event("empty_file", fi, "the file is empty", fatal=not self.opts.skip_bad_records)
                elif f.fmt == "txt":
                    self.txt(fi, data, 0, -1, True)
                else:
                    self.jsonl(fi, data, 1)
                if self.fatal:
                    return
        else:
            fi = u.file_idx[0]
            f = self.ctx.files[fi]
            if u.kind == "range":
                with _reading(f.path), open(f.path, "rb") as fh:
                    fh.seek(u.start)
                    data = fh.read(u.end - u.start)
            else:
                assert u.data is not None
                data = u.data
            if f.fmt == "txt":
                self.txt(fi, data, u.start, u.piece, u.last)
            else:
                self.jsonl(fi, data, u.first_line)

    # -- formats

    def decode(self, raw: bytes, fi: int, *, offset: int | None, line: int | None) -> tuple[str | None, bool]:
        """(text or None when skipped or fatal, had invalid UTF-8)."""
        try:
            return raw.decode("utf-8"), False
        except UnicodeDecodeError as e:
            policy = self.opts.invalid_utf8
            if policy == "replace":
                return raw.decode("utf-8", "replace"), True
            if policy == "skip":
                return None, True
            if offset is None:
                where = f" at byte {e.start} of the line"
            else:
                where = f" at byte {offset + e.start}"
                if self.ctx.files[fi].gz:
                    where += " of the decompressed data"
            self.event(
                "invalid_utf8",
                fi,
                f"not valid UTF-8 ({e.reason}{where}); fix the file or pass --invalid_utf8 replace (or skip)",
                line=line,
                offset=offset,
                fatal=True,
            )
            return None, True

    def txt(self, fi: int, raw: bytes, offset: int, piece: int, last: bool) -> None:
        if piece >= 0:
            segments = [raw]
        else:  # a whole document: hashed piecewise like a long document cut across units
            cuts = cut_offsets(raw, self.opts.unit_bytes)
            bounds = [0, *cuts, len(raw)]
            segments = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        texts, invalid = [], False
        pos = offset
        for seg in segments:
            text, bad = self.decode(seg, fi, offset=pos, line=None)
            if self.fatal:
                return
            pos += len(seg)
            invalid = invalid or bad
            texts.append(text)
        if any(t is None for t in texts):  # --invalid_utf8 skip
            texts = None
        self.document(fi, texts, invalid, piece, last)

    def jsonl(self, fi: int, data: bytes, first_line: int) -> None:
        skip = self.opts.skip_bad_records
        field_name = self.opts.text_field
        for i, line in enumerate(data.split(b"\n")):
            if self.fatal:
                return
            if not line.strip():
                continue
            lineno = first_line + i if first_line else i + 1
            loc = {"line": lineno}
            text_line, bad = self.decode(line, fi, offset=None, line=lineno)
            if self.fatal:
                return
            if text_line is None:  # --invalid_utf8 skip: the record is dropped, and counted
                self.document(fi, None, True, -1, True)
                continue
            try:
                rec = json.loads(text_line)
            except json.JSONDecodeError as e:
                hint = "" if skip else "; fix the line or pass --skip_bad_records"
                self.event(
                    "bad_record",
                    fi,
                    f"not valid JSON ({e.msg} at column {e.colno}){hint}",
                    fatal=not skip,
                    **loc,
                )
                continue
            if not isinstance(rec, dict) or field_name not in rec:
                what = (
                    f"keys: {', '.join(list(rec)[:8])}"
                    if isinstance(rec, dict)
                    else f"a JSON {type(rec).__name__}"
                )
                hint = "" if skip else "; set --text_field or pass --skip_bad_records"
                self.event("bad_record", fi, f"no field {field_name!r} ({what}){hint}", fatal=not skip, **loc)
                continue
            text = rec[field_name]
            if not isinstance(text, str):
                hint = "" if skip else "; pass --skip_bad_records to skip such records"
                self.event(
                    "bad_record",
                    fi,
                    f"field {field_name!r} is {type(text).__name__}, expected a string{hint}",
                    fatal=not skip,
                    **loc,
                )
                continue
            self.document(fi, self.split_long(text), bad, -1, True)

    def split_long(self, text: str) -> list[str]:
        """A long JSONL text in the pieces its bytes would be cut into as a .txt document (same hash)."""
        u = self.opts.unit_bytes
        if len(text) <= (u + u // 4) // 4:  # at most u + u/4 bytes: never cut
            return [text]
        raw = text.encode("utf-8", "surrogatepass")
        bounds = [0, *cut_offsets(raw, u), len(raw)]
        if len(bounds) == 2:
            return [text]
        return [raw[a:b].decode("utf-8", "surrogatepass") for a, b in zip(bounds, bounds[1:], strict=False)]

    # -- one document (or one piece of one)

    def document(self, fi: int, texts: list[str] | None, invalid: bool, piece: int, last: bool) -> None:
        opts = self.opts
        if texts is None:  # not decoded (--invalid_utf8 skip): no text, dropped by the main process
            self.res.parts.append(
                _Part(fi, piece, last, 0, _digest(b""), 0, True, True, False, 0, False, False)
            )
            return
        text, digests, removed, normalized, surrogates = _clean_texts(texts, opts)
        chars = len(text)
        blank = not text or text.isspace()
        contaminated, head, tail = self.contamination(text, piece)
        if piece >= 0:
            # The document's fate is decided when its last piece arrives; tokenise unless surely dropped.
            wanted = not contaminated and not (invalid and opts.invalid_utf8 == "skip")
        else:
            wanted = not (
                blank or chars < opts.min_chars or contaminated or (invalid and opts.invalid_utf8 == "skip")
            )
        ntokens = self.tokens(text, last) if self.tokenize and wanted else 0
        digest = _combine_digests(digests) if piece < 0 else digests[0]
        self.res.parts.append(
            _Part(
                fi,
                piece,
                last,
                chars,
                digest,
                ntokens,
                blank,
                invalid,
                normalized,
                removed,
                surrogates,
                contaminated,
                head,
                tail,
            )
        )

    def contamination(self, text: str, piece: int) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
        """(whether `text` holds an evaluation n-gram, and for a piece its first and last n-1 words)."""
        contaminated = False
        head: tuple[str, ...] = ()
        tail: tuple[str, ...] = ()
        if self.ctx.eval is not None:
            words = _words(text)
            contaminated = _has_ngram(words, self.ctx.eval)
            if piece >= 0 and self.ctx.eval.n > 1:
                k = self.ctx.eval.n - 1
                head, tail = tuple(words[:k]), tuple(words[-k:])
        return contaminated, head, tail

    def tokens(self, text: str, last: bool) -> int:
        """Tokenises `text` (then <|endoftext|> if the document ends here); the number of tokens."""
        ids = get_encoding().encode_to_numpy(text, disallowed_special=())
        self.token_arrays.append(ids)
        ntokens = len(ids)
        if last:
            self.token_arrays.append(np.array([EOT_ID], dtype=np.uint32))
            ntokens += 1
        return ntokens


def _clean_texts(texts: list[str], opts: PrepareOptions) -> tuple[str, list[bytes], int, bool, bool]:
    """The cleaned text of a document's segments: (text, each segment's hash, control characters removed,
    whether normalisation changed it, whether lone surrogates were replaced)."""
    cleaned, digests = [], []
    removed, normalized, surrogates = 0, False, False
    for t in texts:
        t, r, ch = clean_text(t, opts.normalize, opts.remove_control)
        try:
            b = t.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes: as tiktoken does
            t = t.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            b = t.encode("utf-8")
            surrogates = True
        cleaned.append(t)
        digests.append(_digest(b))
        removed += r
        normalized = normalized or ch
    text = cleaned[0] if len(cleaned) == 1 else "".join(cleaned)
    return text, digests, removed, normalized, surrogates
