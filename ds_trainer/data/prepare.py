"""Corpus preparation: text and JSONL files (optionally gzip) → cleaned, deduplicated, split, tokenised shards.

Output folder OUT (format `ds_trainer.tokens.v1`, read by ds_trainer.data.shards), per split (train, val):

- `{split}_{i:06d}.bin`: little-endian uint16 token ids, every shard exactly `shard_tokens` tokens except the
  last one of its split; each document's tokens (tiktoken `encode_ordinary`) are followed by <|endoftext|>.
- `{split}.json`: metadata, written last and atomically; its presence means the split is complete.
  val.json is written before train.json, so a folder holding train.json is complete. Its `tokens`,
  `documents` and `shards` are the split's; `sources` (documents read per input file, `documents_in`),
  `cleaning`, `dedup` and `decontamination` describe the whole input, so both files carry them alike.
- `progress.json`: what is committed, for resuming (kept after the end: it records the options).

Pipeline (the main process plans and writes, worker processes do the work):

1. Inputs (files, folders, globs) are resolved into a sorted list of `.txt`, `.jsonl`, `.txt.gz`, `.jsonl.gz`
   files. A `.txt` file is one document; each JSONL line is one document (its `text_field`).
2. The main process cuts the input into *work units* of about `unit_bytes` input bytes, in a fixed global
   order: batches of small files, byte ranges of big uncompressed files (JSONL at line ends, a long `.txt`
   document at safe cut points, see `cut_offsets`), or decompressed chunks of big gzip files. Units
   depend only on the input bytes and `unit_bytes`, never on the number of workers.
3. Workers (`--workers` processes, at most 4 units per worker in flight) read their unit, decode it,
   clean every document (control characters, Unicode normalisation), hash it (blake2b-128 of the cleaned
   UTF-8 text), check it for evaluation n-grams and tokenise it.
4. The main process takes the results strictly in unit order and decides, per document: empty/too short,
   exact duplicate (a set of the hashes seen so far), contaminated, and train or validation (from the
   seed and the document's hash alone: order-independent). Kept tokens are appended to the split's
   current shard.

A long `.txt` document is cut into pieces right after a "\\n" whose previous byte is printable
non-space ASCII and whose next byte is an ASCII letter. GPT-2's pre-tokeniser always splits there (the
"\\n" is its own pre-token, and no pre-token spans it), and the cleaning steps act on both sides
independently, so cleaning and tokenising the pieces separately gives exactly the tokens of the whole
text. The pieces of a document are spread over units (so one 1 GB document still uses every core);
its hash is then blake2b over its pieces' hashes, and its tokens wait in the main process until its
last piece arrives (memory: about half a byte per input byte of the longest document).

Resume (crash-safe, also after SIGKILL): the shard being filled is written straight to
`{split}_{i:06d}.bin.tmp` and renamed to `.bin` (os.replace) only when complete, so a half-written
shard never carries a final name. After each unit that completed a shard (and at least every 30 s),
with no document pending, the main process fsyncs the `.tmp` files and atomically rewrites
progress.json: the options fingerprint, `units_done` (units fully handled) and, per split, the
committed shards and the token count of its `.tmp` file. A rerun with the same command re-reads
and re-cleans the units before `units_done` (to rebuild the duplicate set and statistics, which are
deterministic), but does not tokenise them; it truncates each `.tmp` to the recorded count (a shard
renamed after the last checkpoint is taken back first) and carries on from unit `units_done`. The
shards are byte-identical to an uninterrupted run. A different options fingerprint is refused, and a
finished folder with the same options is reported as "already prepared" (a missing or damaged
`{split}.json` is first rewritten from progress.json, which keeps a copy).

OS errors (unreadable input, unwritable or full --out) stop the run with one DsTrainerError line naming
the file, the OS's reason and the fix, also when they happen in a worker process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import gzip
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import stat
import sys
import time
import unicodedata
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ds_trainer.atomic_io import fsync_dir, write_atomic
from ds_trainer.data.shards import FORMAT, PROGRESS_FILE
from ds_trainer.errors import DsTrainerError
from ds_trainer.tokenizer import EOT_ID, get_encoding, identity

PROGRESS_FORMAT = "ds_trainer.prepare.progress.v1"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_UNIT_BYTES = 256 * 1024
CHECKPOINT_SECONDS = 30.0
NORMALIZE_FORMS = ("NFC", "NFKC", "none")
INVALID_UTF8_POLICIES = ("error", "replace", "skip")
MAX_WARNINGS = 20

# Test hook: seconds each worker sleeps per work unit, to make a preparation slow enough to be killed
# midway in tests/test_prepare.py. Not an option for users.
SLOW_UNITS_ENV = "DS_TRAINER_PREPARE_SLOW_UNITS"

_SUFFIXES = {
    ".txt.gz": ("txt", True),
    ".jsonl.gz": ("jsonl", True),
    ".txt": ("txt", False),
    ".jsonl": ("jsonl", False),
}
_SUPPORTED = ".txt, .jsonl, .txt.gz or .jsonl.gz"
# C0 and C1 control characters except \t and \n (\r goes too: "\r\n" becomes "\n").
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WORD_RE = re.compile(r"\w+")
# A safe cut: after "\n", with printable non-space ASCII before it and an ASCII letter after it.
_CUT_RE = re.compile(rb"[\x21-\x7e]\n(?=[A-Za-z])")


# --- OS errors as one-line errors ---------------------------------------------------------------------------

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


# --- options and inputs ------------------------------------------------------------------------------------


@dataclass
class PrepareOptions:
    """Everything that shapes the output (the worker count does not). See launch/prepare_data.py --help."""

    val_fraction: float = 0.005
    seed: int = 1234
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    text_field: str = "text"
    min_chars: int = 0
    normalize: str = "NFC"
    remove_control: bool = True
    decontaminate: tuple[str, ...] = ()
    ngram: int = 13
    invalid_utf8: str = "error"
    skip_bad_records: bool = False
    unit_bytes: int = DEFAULT_UNIT_BYTES

    def validate(self) -> None:
        problems = []
        if not 0.0 <= self.val_fraction <= 1.0:
            problems.append(f"--val_fraction {self.val_fraction}: must be between 0 and 1")
        if self.shard_tokens < 1:
            problems.append(f"--shard_tokens {self.shard_tokens}: must be at least 1")
        if self.min_chars < 0:
            problems.append(f"--min_chars {self.min_chars}: must be 0 or more")
        if self.ngram < 1:
            problems.append(f"--ngram {self.ngram}: must be at least 1")
        if self.unit_bytes < 1024:
            problems.append(f"--unit_bytes {self.unit_bytes}: must be at least 1024")
        forms = {f.lower(): f for f in NORMALIZE_FORMS}
        if str(self.normalize).lower() not in forms:
            problems.append(f"--normalize {self.normalize}: expected one of {', '.join(NORMALIZE_FORMS)}")
        else:
            self.normalize = forms[str(self.normalize).lower()]
        if self.invalid_utf8 not in INVALID_UTF8_POLICIES:
            problems.append(
                f"--invalid_utf8 {self.invalid_utf8}: expected one of {', '.join(INVALID_UTF8_POLICIES)}"
            )
        if not self.text_field:
            problems.append("--text_field: must not be empty")
        if problems:
            raise DsTrainerError("; ".join(problems))
        self.decontaminate = tuple(str(p) for p in self.decontaminate)


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


# --- cleaning, hashing, cutting ----------------------------------------------------------------------------


def clean_text(text: str, normalize: str = "NFC", remove_control: bool = True) -> tuple[str, int, bool]:
    """(cleaned text, control characters removed, whether normalisation changed it).

    Control characters (C0/C1 except \\t and \\n) go first, then Unicode normalisation (NFC, NFKC or none).
    """
    removed = 0
    if remove_control and _CONTROL_RE.search(text):
        text, removed = _CONTROL_RE.subn("", text)
    changed = False
    if normalize != "none" and not unicodedata.is_normalized(normalize, text):
        text = unicodedata.normalize(normalize, text)
        changed = True
    return text, removed, changed


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _combine_digests(digests: Sequence[bytes]) -> bytes:
    """The hash of a document cut into pieces: blake2b over the pieces' hashes."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.blake2b(b"".join(digests), digest_size=16, person=b"ds_trainer.piece").digest()


def split_of(digest: bytes, seed: int, val_fraction: float) -> str:
    """'val' iff blake2b(seed, document hash) / 2**64 < val_fraction: fixed by the seed, order-independent."""
    h = hashlib.blake2b(int(seed).to_bytes(16, "little", signed=True) + digest, digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2.0**64 < val_fraction else "train"


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


# --- evaluation n-grams (decontamination) ------------------------------------------------------------------


@dataclass
class _EvalNgrams:
    n: int
    grams: set[tuple[str, ...]]
    vocab: frozenset[str]
    documents: int
    files: list[str]


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _has_ngram(words: Sequence[str], ev: _EvalNgrams) -> bool:
    """Whether any n consecutive words are an evaluation n-gram (only runs of evaluation words are looked up)."""
    n, vocab, grams = ev.n, ev.vocab, ev.grams
    run = 0
    for i, w in enumerate(words):
        if w in vocab:
            run += 1
            if run >= n and tuple(words[i - n + 1 : i + 1]) in grams:
                return True
        else:
            run = 0
    return False


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


def _load_eval(files: list[InputFile], opts: PrepareOptions) -> _EvalNgrams:
    grams: set[tuple[str, ...]] = set()
    vocab: set[str] = set()
    docs = 0
    n = opts.ngram
    for f in files:
        data = _read_file_bytes(f, "--decontaminate")
        if f.fmt == "txt":
            texts = [data.decode("utf-8", "replace")]
        else:
            texts = []
            for lineno, line in enumerate(data.split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.decode("utf-8", "replace"))
                except json.JSONDecodeError as e:
                    raise DsTrainerError(
                        f"--decontaminate {f.path}:{lineno}: not valid JSON ({e.msg})"
                    ) from None
                text = rec.get(opts.text_field) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise DsTrainerError(
                        f"--decontaminate {f.path}:{lineno}: no string field {opts.text_field!r}; set --text_field"
                    )
                texts.append(text)
        for text in texts:
            docs += 1
            words = _words(clean_text(text, opts.normalize, opts.remove_control)[0])
            for i in range(len(words) - n + 1):
                gram = tuple(words[i : i + n])
                grams.add(gram)
                vocab.update(gram)
    return _EvalNgrams(n, grams, frozenset(vocab), docs, [f.path for f in files])


# --- work units and their processing (worker side) ---------------------------------------------------------


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
        chars = len(text)
        blank = not text or text.isspace()
        contaminated = False
        head: tuple[str, ...] = ()
        tail: tuple[str, ...] = ()
        if self.ctx.eval is not None:
            words = _words(text)
            contaminated = _has_ngram(words, self.ctx.eval)
            if piece >= 0 and self.ctx.eval.n > 1:
                k = self.ctx.eval.n - 1
                head, tail = tuple(words[:k]), tuple(words[-k:])
        if piece >= 0:
            # The document's fate is decided when its last piece arrives; tokenise unless surely dropped.
            wanted = not contaminated and not (invalid and opts.invalid_utf8 == "skip")
        else:
            wanted = not (
                blank or chars < opts.min_chars or contaminated or (invalid and opts.invalid_utf8 == "skip")
            )
        ntokens = 0
        if self.tokenize and wanted:
            ids = get_encoding().encode_to_numpy(text, disallowed_special=())
            self.token_arrays.append(ids)
            ntokens = len(ids)
            if last:
                self.token_arrays.append(np.array([EOT_ID], dtype=np.uint32))
                ntokens += 1
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


# --- the shard writer (main process) -----------------------------------------------------------------------


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


# --- the output folder --------------------------------------------------------------------------------------


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


# --- progress bar -------------------------------------------------------------------------------------------


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


class _ProgressBar:
    def __init__(self, total_bytes: int, enabled: bool, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.total = max(1, total_bytes)
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.shown = False

    def update(self, done_bytes: int, new_tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        frac = min(1.0, done_bytes / self.total)
        rate = done_bytes / dt
        eta = (self.total - done_bytes) / rate if rate > 0 else 0.0
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = (
            f"prepare [{bar}] {frac * 100:5.1f}% {done_bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB | "
            f"{rate / 1e6:.1f} MB/s | {_fmt_count(new_tokens / dt)} tok/s | {_fmt_count(new_tokens)} tokens | "
            f"eta {_fmt_seconds(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.enabled and self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# --- the preparation (main process) -------------------------------------------------------------------------


class _InlineExecutor:
    """workers=0: every unit in this process, one at a time (tests and debugging)."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


@dataclass
class _Pending:
    """A long document whose pieces are still arriving."""

    file_idx: int
    digests: list[bytes] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    chars: int = 0
    blank: bool = True
    invalid: bool = False
    normalized: bool = False
    control_removed: int = 0
    contaminated: bool = False
    carry: tuple[str, ...] = ()


class _Preparation:
    def __init__(
        self,
        files: list[InputFile],
        opts: PrepareOptions,
        out: Path,
        workers: int,
        progress: bool,
        eval_ngrams: _EvalNgrams | None,
        state: dict | None,
        options_record: dict,
        fingerprint: str,
        empty_skipped: int,
        out_stream,
    ) -> None:
        self.files, self.opts, self.out, self.workers = files, opts, out, workers
        self.eval = eval_ngrams
        self.options_record, self.fingerprint = options_record, fingerprint
        self.out_stream = out_stream
        self.units_done = int(state["units_done"]) if state else 0
        splits = state["splits"] if state else {}
        self.writers = {s: _ShardWriter(out, s, opts.shard_tokens, splits.get(s)) for s in SPLITS}
        self.resumed_shards = {s: len(self.writers[s].shards) for s in SPLITS}
        self.resumed_tokens = sum(w.tokens for w in self.writers.values())
        self.bar = _ProgressBar(sum(f.size for f in files), progress)
        self.seen: set[bytes] = set()
        self.pending: _Pending | None = None
        self.docs = {s: 0 for s in SPLITS}
        self.source_docs = [0] * len(files)
        self.stats = {
            "documents_in": 0,
            "dropped_invalid_utf8": 0,
            "invalid_utf8_documents": 0,
            "dropped_empty": 0,
            "dropped_short": 0,
            "dropped_duplicate": 0,
            "dropped_contaminated": 0,
            "normalized_documents": 0,
            "control_chars_removed": 0,
            "documents_with_control_chars": 0,
            "surrogates_replaced_documents": 0,
            "bad_records_skipped": 0,
            "empty_files_skipped": empty_skipped,
        }
        self.warnings = 0
        self.line_cache: dict[int, tuple[int, int]] = {}
        self.new_tokens = 0
        self.done_bytes = 0
        self.units_total = 0
        self.units_skipped = 0

    # -- messages

    def warn(self, message: str) -> None:
        self.warnings += 1
        if self.warnings <= MAX_WARNINGS:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        elif self.warnings == MAX_WARNINGS + 1:
            print("warning: more warnings follow; only their count is reported", file=sys.stderr, flush=True)

    def line_base(self, fi: int, start: int) -> int:
        """Lines before byte `start` of file `fi` (counted only when a message needs a line number)."""
        off, lines = self.line_cache.get(fi, (0, 0))
        if start < off:
            off, lines = 0, 0
        path = self.files[fi].path
        with _reading(path), open(path, "rb") as fh:
            fh.seek(off)
            while off < start:
                chunk = fh.read(min(1 << 20, start - off))
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                off += len(chunk)
        self.line_cache[fi] = (off, lines)
        return lines

    def location(self, unit: _Unit, ev: _Event) -> str:
        path = self.files[ev.file_idx].path
        if ev.line is not None:
            line = ev.line if unit.first_line else self.line_base(ev.file_idx, unit.start) + ev.line
            return f"{path}:{line}"
        return path

    # -- the run

    def run(self) -> dict:
        opts = self.opts
        ctx = _Ctx(self.files, opts, self.eval, float(os.environ.get(SLOW_UNITS_ENV) or 0))
        if self.workers == 0:
            _init_worker(ctx, None)
            executor = _InlineExecutor()
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            executor = ProcessPoolExecutor(
                self.workers,
                mp_context=mp.get_context(method),
                initializer=_init_worker,
                initargs=(ctx, os.getpid()),
            )
        t0 = time.perf_counter()
        last_checkpoint = time.monotonic()
        max_in_flight = 4 * max(1, self.workers)
        in_flight: deque[tuple[_Unit, bool, Future]] = deque()
        try:
            units = _plan_units(self.files, opts.unit_bytes)
            exhausted = False
            while True:
                while not exhausted and len(in_flight) < max_in_flight:
                    unit = next(units, None)
                    if unit is None:
                        exhausted = True
                        break
                    tokenize = unit.index >= self.units_done
                    in_flight.append((unit, tokenize, executor.submit(_process_unit, unit, tokenize)))
                if not in_flight:
                    break
                unit, tokenize, fut = in_flight.popleft()
                try:
                    res = fut.result()
                except DsTrainerError as e:
                    # From a worker, the pool attaches the worker's traceback as the cause; the line is enough.
                    raise DsTrainerError(str(e)) from None
                except BrokenProcessPool as e:
                    raise DsTrainerError(
                        f"a worker process died ({e}); out of memory? rerun the same command to resume "
                        "(perhaps with fewer --workers)"
                    ) from None
                unit.data = None
                self.handle(unit, res, tokenize)
                self.units_total += 1
                self.units_skipped += not tokenize
                self.done_bytes += unit.nbytes
                self.bar.update(self.done_bytes, self.new_tokens)
                if tokenize and self.pending is None:
                    commits = sum(w.commits for w in self.writers.values())
                    if commits or time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                        self.checkpoint(unit.index + 1)
                        last_checkpoint = time.monotonic()
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            for w in self.writers.values():
                w.close()
            raise
        executor.shutdown(wait=True)
        assert self.pending is None
        self.bar.update(self.done_bytes, self.new_tokens, force=True)
        self.bar.close()
        for w in self.writers.values():
            w.finish()
        seconds = time.perf_counter() - t0
        metas = {s: self.metadata(s) for s in SPLITS}
        final = {"metadata": metas, "summary": self.summary_numbers(seconds)}
        self.write_progress(self.units_total, done=True, final=final)
        self.write_metadata(metas)
        self.print_summary(final["summary"])
        return {**final["summary"], "metadata": metas, "already_prepared": False}

    def handle(self, unit: _Unit, res: _Result, tokenize: bool) -> None:
        for ev in res.events:
            loc = self.location(unit, ev)
            if ev.fatal:
                raise DsTrainerError(f"{loc}: {ev.message}")
            if ev.kind == "empty_file":
                self.stats["empty_files_skipped"] += 1
                self.warn(f"{loc}: the file is empty; skipped")
            else:
                self.stats["bad_records_skipped"] += 1
                self.warn(f"{loc}: {ev.message}; skipped")
        tokens = res.tokens
        pos = 0
        segments: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
        for part in res.parts:
            a, pos = pos, pos + part.ntokens
            if part.piece < 0:
                split = self.decide(
                    part.file_idx, part.digest, part.chars, part.blank, part.invalid, part.normalized,
                    part.control_removed, part.contaminated, part.surrogates,
                )  # fmt: skip
                if split is not None and tokenize:
                    seg = segments[split]
                    if seg and seg[-1][1] == a:
                        seg[-1] = (seg[-1][0], pos)
                    else:
                        seg.append((a, pos))
                continue
            # A piece of a long document.
            p = self.pending
            if part.piece == 0:
                assert p is None
                p = self.pending = _Pending(part.file_idx)
            assert p is not None
            p.digests.append(part.digest)
            p.chars += part.chars
            p.blank = p.blank and part.blank
            p.invalid = p.invalid or part.invalid
            p.normalized = p.normalized or part.normalized
            p.control_removed += part.control_removed
            p.contaminated = p.contaminated or part.contaminated
            if self.eval is not None and not p.contaminated and self.eval.n > 1:
                joined = p.carry + part.head
                p.contaminated = _has_ngram(joined, self.eval)
                k = self.eval.n - 1
                p.carry = (p.carry + part.tail)[-k:] if len(part.head) < k else part.tail
            if tokenize and part.ntokens and tokens is not None:
                p.tokens.append(tokens[a:pos])
            if part.last:
                self.pending = None
                split = self.decide(
                    p.file_idx, _combine_digests(p.digests), p.chars, p.blank, p.invalid, p.normalized,
                    p.control_removed, p.contaminated, False,
                )  # fmt: skip
                if split is not None and tokenize:
                    self.append(split, np.concatenate(p.tokens))
        if tokens is not None:
            for split, segs in segments.items():
                if segs:
                    self.append(split, np.concatenate([tokens[a:b] for a, b in segs]))

    def append(self, split: str, arr: np.ndarray) -> None:
        self.writers[split].append(arr)
        self.new_tokens += len(arr)

    def decide(
        self, fi, digest, chars, blank, invalid, normalized, removed, contaminated, surrogates
    ) -> str | None:
        """The split a finished document goes to, or None when it is dropped (and why is counted)."""
        st = self.stats
        st["documents_in"] += 1
        self.source_docs[fi] += 1
        if invalid:
            st["invalid_utf8_documents"] += 1
            if self.opts.invalid_utf8 == "skip":
                st["dropped_invalid_utf8"] += 1
                return None
        st["normalized_documents"] += normalized
        st["control_chars_removed"] += removed
        st["documents_with_control_chars"] += removed > 0
        st["surrogates_replaced_documents"] += surrogates
        if blank:
            st["dropped_empty"] += 1
            return None
        if chars < self.opts.min_chars:
            st["dropped_short"] += 1
            return None
        if digest in self.seen:
            st["dropped_duplicate"] += 1
            return None
        self.seen.add(digest)
        if contaminated:
            st["dropped_contaminated"] += 1
            return None
        split = split_of(digest, self.opts.seed, self.opts.val_fraction)
        self.docs[split] += 1
        return split

    # -- progress.json and metadata

    def checkpoint(self, units_done: int) -> None:
        for w in self.writers.values():
            w.sync()
        fsync_dir(self.out)
        self.write_progress(units_done, done=False)
        for w in self.writers.values():
            w.commits = 0

    def write_progress(self, units_done: int, done: bool, final: dict | None = None) -> None:
        _write_json_atomic(
            self.out / PROGRESS_FILE,
            {
                "format": PROGRESS_FORMAT,
                "fingerprint": self.fingerprint,
                "options": self.options_record,
                "units_done": units_done,
                "done": done,
                "splits": {s: w.state() for s, w in self.writers.items()},
                "final": final,
            },
        )

    def metadata(self, split: str) -> dict:
        w = self.writers[split]
        opts = self.opts
        ev = self.eval
        st = self.stats
        return {
            "format": FORMAT,
            "split": split,
            "dtype": "uint16",
            "tokens": w.tokens,
            "documents": self.docs[split],
            "shards": [{"file": s["file"], "tokens": s["tokens"], "sha256": s["sha256"]} for s in w.shards],
            "tokenizer": identity(),
            "max_token_id": max([s["max_token_id"] for s in w.shards], default=0),
            # Read from each file before any drop, both splits together (as in "cleaning"); named
            # documents_in so it is not taken for the split's count in "documents" above.
            "sources": [
                {"path": f.path, "documents_in": n, "bytes": f.size}
                for f, n in zip(self.files, self.source_docs, strict=True)
            ],
            "cleaning": {
                "documents_in": st["documents_in"],
                "normalize": opts.normalize,
                "normalized_documents": st["normalized_documents"],
                "remove_control_chars": opts.remove_control,
                "control_chars_removed": st["control_chars_removed"],
                "documents_with_control_chars": st["documents_with_control_chars"],
                "invalid_utf8": opts.invalid_utf8,
                "invalid_utf8_documents": st["invalid_utf8_documents"],
                "dropped_invalid_utf8": st["dropped_invalid_utf8"],
                "surrogates_replaced_documents": st["surrogates_replaced_documents"],
                "min_chars": opts.min_chars,
                "dropped_empty": st["dropped_empty"],
                "dropped_short": st["dropped_short"],
                "skip_bad_records": opts.skip_bad_records,
                "bad_records_skipped": st["bad_records_skipped"],
                "empty_files_skipped": st["empty_files_skipped"],
            },
            "dedup": {
                "method": "exact: blake2b-128 of the cleaned UTF-8 text (of its pieces' hashes for a document "
                "cut into pieces); the first occurrence in input order is kept",
                "documents_checked": st["documents_in"]
                - st["dropped_invalid_utf8"]
                - st["dropped_empty"]
                - st["dropped_short"],
                "dropped_duplicate": st["dropped_duplicate"],
            },
            "decontamination": {
                "enabled": ev is not None,
                "files": ev.files if ev else [],
                "ngram": opts.ngram,
                "eval_documents": ev.documents if ev else 0,
                "eval_ngrams": len(ev.grams) if ev else 0,
                "words": r"lower-cased \w+ runs of the cleaned text",
                "dropped_contaminated": st["dropped_contaminated"],
            },
            "seed": opts.seed,
            "val_fraction": opts.val_fraction,
            "shard_tokens": opts.shard_tokens,
        }

    def write_metadata(self, metas: dict) -> None:
        _write_metadata(self.out, metas)

    def summary_numbers(self, seconds: float) -> dict:
        st = self.stats
        kept = sum(self.docs.values())
        return {
            "out": str(self.out),
            "documents_in": st["documents_in"],
            "documents_kept": kept,
            "documents": dict(self.docs),
            "dropped": {
                "invalid_utf8": st["dropped_invalid_utf8"],
                "empty": st["dropped_empty"],
                "short": st["dropped_short"],
                "duplicate": st["dropped_duplicate"],
                "contaminated": st["dropped_contaminated"],
            },
            "invalid_utf8_documents": st["invalid_utf8_documents"],
            "bad_records_skipped": st["bad_records_skipped"],
            "empty_files_skipped": st["empty_files_skipped"],
            "tokens": {s: w.tokens for s, w in self.writers.items()},
            "shards": {s: len(w.shards) for s, w in self.writers.items()},
            "seconds": round(seconds, 3),
            "input_bytes": self.done_bytes,
            "tokenized_tokens": self.new_tokens,
            "tokens_per_second": round(self.new_tokens / max(seconds, 1e-9), 1),
            "resumed": {
                "shards": dict(self.resumed_shards),
                "tokens": self.resumed_tokens,
                "units_skipped": self.units_skipped,
                "units": self.units_total,
            }
            if self.units_done
            else None,
        }

    def print_summary(self, s: dict) -> None:
        def p(line: str) -> None:
            print(line, file=self.out_stream, flush=True)

        if s["resumed"]:
            r = s["resumed"]
            p(
                f"resumed: {sum(r['shards'].values())} shards already committed (train {r['shards']['train']}, "
                f"val {r['shards']['val']}; {r['tokens']:,} tokens); {r['units_skipped']} of {r['units']} work units "
                "were re-read but not re-tokenised"
            )
        d = s["dropped"]
        p(
            f"documents: {s['documents_in']:,} in, {s['documents_kept']:,} kept (train {s['documents']['train']:,}, "
            f"val {s['documents']['val']:,}); dropped: {d['duplicate']:,} duplicate, {d['empty']:,} empty, "
            f"{d['short']:,} short, {d['contaminated']:,} contaminated, {d['invalid_utf8']:,} invalid UTF-8; "
            f"skipped: {s['bad_records_skipped']:,} bad records, {s['empty_files_skipped']:,} empty files"
        )
        if s["invalid_utf8_documents"]:
            done = (
                "dropped"
                if self.opts.invalid_utf8 == "skip"
                else "kept with U+FFFD in place of the bad bytes"
            )
            print(
                f"warning: {s['invalid_utf8_documents']:,} documents had invalid UTF-8; {done} "
                f"(--invalid_utf8 {self.opts.invalid_utf8})",
                file=sys.stderr,
                flush=True,
            )
        for split in SPLITS:
            n = s["shards"][split]
            p(f"{split}: {s['tokens'][split]:,} tokens in {n} shard{'s' * (n != 1)}")
        p(
            f"prepared {s['out']} in {s['seconds']:.1f}s: {s['input_bytes'] / 1e6:,.1f} MB read, "
            f"{s['tokenized_tokens']:,} tokens tokenised this run, {s['tokens_per_second']:,.0f} tokens/s"
        )


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def prepare(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    progress: bool = True,
    out_stream=None,
    **options,
) -> dict:
    """Prepare `inputs` into shards in `out` (see the module docstring); resumes an interrupted run.

    `options` are the fields of PrepareOptions. `workers=None` uses every core, 0 works in this process.
    Returns the summary numbers, with `metadata` (both splits) and `already_prepared`.
    """
    opts = PrepareOptions(**options)
    opts.validate()
    out_stream = out_stream or sys.stdout
    if workers is None:
        workers = default_workers()
    if workers < 0:
        raise DsTrainerError(f"--workers {workers}: must be 0 (in this process) or more")
    if not inputs:
        raise DsTrainerError("no inputs given")
    files = resolve_inputs(inputs)
    eval_files = resolve_inputs(opts.decontaminate, "--decontaminate") if opts.decontaminate else []
    empty = [f for f in files if f.size == 0]
    if empty and not opts.skip_bad_records:
        raise DsTrainerError(f"{empty[0].path}: the file is empty; remove it or pass --skip_bad_records")
    for f in empty:
        print(f"warning: {f.path}: the file is empty; skipped", file=sys.stderr, flush=True)

    def files_digest(fs: list[InputFile]) -> str:
        listing = json.dumps([[f.path, f.size, f.mtime_ns] for f in fs])
        return f"{len(fs)} files, sha256 {hashlib.sha256(listing.encode()).hexdigest()}"

    # Stored in progress.json (rewritten at each checkpoint): the file lists only as digests.
    record = {
        "format": FORMAT,
        "tokenizer": identity()["ranks_sha256"],
        "inputs": files_digest(files),
        "decontaminate": files_digest(eval_files),
        **{k: v for k, v in asdict(opts).items() if k != "decontaminate"},
    }
    fingerprint = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    out_path = Path(out)
    od = _OutDir(out_path)
    try:
        state = od.open()
        if state is not None:
            if state.get("format") != PROGRESS_FORMAT or state.get("fingerprint") != fingerprint:
                finished = (out_path / "train.json").is_file()
                what = "a finished preparation" if finished else "an unfinished preparation"
                raise DsTrainerError(
                    f"--out {out_path} holds {what} made with different options "
                    f"({_option_differences(state.get('options') or {}, record)}); nothing was changed: "
                    "rerun with the original options, or choose another --out"
                )
            if state.get("done"):
                final = state["final"]
                if not _metadata_intact(out_path, final["metadata"]):
                    _write_metadata(out_path, final["metadata"])
                s = final["summary"]
                print(
                    f"already prepared: {out_path} (train {s['tokens']['train']:,} tokens in {s['shards']['train']} "
                    f"shards, val {s['tokens']['val']:,} tokens in {s['shards']['val']} shards)",
                    file=out_stream,
                    flush=True,
                )
                return {**s, "metadata": final["metadata"], "already_prepared": True}
        eval_ngrams = _load_eval(eval_files, opts) if eval_files else None
        run = _Preparation(
            files,
            opts,
            out_path,
            workers,
            progress,
            eval_ngrams,
            state,
            record,
            fingerprint,
            len(empty),
            out_stream,
        )
        try:
            if state is None:
                run.write_progress(0, done=False)
            return run.run()
        except DsTrainerError:
            # A new folder that failed before committing anything is removed again: nothing to resume.
            if od.created and not any(w.shards for w in run.writers.values()) and run.units_done == 0:
                _remove_our_files(out_path)
            raise
    finally:
        od.close()


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
