"""The preparation (main process): work units handed to workers, their results taken in order, documents
decided (dropped, train or val), tokens appended to shards, progress checkpointed for resuming."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ds_trainer.atomic_io import fsync_dir
from ds_trainer.data.prepare.cleaning import _combine_digests, split_of
from ds_trainer.data.prepare.decontamination import _EvalNgrams, _has_ngram
from ds_trainer.data.prepare.inputs import InputFile
from ds_trainer.data.prepare.io_errors import _reading
from ds_trainer.data.prepare.options import PrepareOptions
from ds_trainer.data.prepare.out_dir import PROGRESS_FORMAT, SPLITS, _write_json_atomic, _write_metadata
from ds_trainer.data.prepare.progress_bar import _ProgressBar
from ds_trainer.data.prepare.report import print_summary, split_metadata, summary_numbers
from ds_trainer.data.prepare.shard_writer import _ShardWriter
from ds_trainer.data.prepare.units import _plan_units, _Unit
from ds_trainer.data.prepare.worker import (
    SLOW_UNITS_ENV,
    _Ctx,
    _Event,
    _init_worker,
    _Part,
    _process_unit,
    _Result,
)
from ds_trainer.data.shards import PROGRESS_FILE
from ds_trainer.errors import DsTrainerError

CHECKPOINT_SECONDS = 30.0
MAX_WARNINGS = 20


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
        executor = self.start_executor()
        t0 = time.perf_counter()
        try:
            self.run_units(executor)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            for w in self.writers.values():
                w.close()
            raise
        executor.shutdown(wait=True)
        return self.finish(t0)

    def start_executor(self) -> _InlineExecutor | ProcessPoolExecutor:
        ctx = _Ctx(self.files, self.opts, self.eval, float(os.environ.get(SLOW_UNITS_ENV) or 0))
        if self.workers == 0:
            _init_worker(ctx, None)
            return _InlineExecutor()
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        return ProcessPoolExecutor(
            self.workers,
            mp_context=mp.get_context(method),
            initializer=_init_worker,
            initargs=(ctx, os.getpid()),
        )

    def run_units(self, executor: _InlineExecutor | ProcessPoolExecutor) -> None:
        """Every work unit: submitted in order, at most 4 per worker in flight, and handled in order."""
        last_checkpoint = time.monotonic()
        max_in_flight = 4 * max(1, self.workers)
        in_flight: deque[tuple[_Unit, bool, Future]] = deque()
        units = _plan_units(self.files, self.opts.unit_bytes)
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
            res = _unit_result(fut)
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

    def finish(self, t0: float) -> dict:
        """After the last unit: the last shards, metadata and summary; the summary numbers returned."""
        assert self.pending is None
        self.bar.update(self.done_bytes, self.new_tokens, force=True)
        self.bar.close()
        for w in self.writers.values():
            w.finish()
        seconds = time.perf_counter() - t0
        metas = {s: split_metadata(self, s) for s in SPLITS}
        final = {"metadata": metas, "summary": summary_numbers(self, seconds)}
        self.write_progress(self.units_total, done=True, final=final)
        _write_metadata(self.out, metas)
        print_summary(final["summary"], self.opts, self.out_stream)
        return {**final["summary"], "metadata": metas, "already_prepared": False}

    def handle(self, unit: _Unit, res: _Result, tokenize: bool) -> None:
        self.report_events(unit, res.events)
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
            self.add_piece(part, tokens, a, pos, tokenize)
        if tokens is not None:
            for split, segs in segments.items():
                if segs:
                    self.append(split, np.concatenate([tokens[a:b] for a, b in segs]))

    def report_events(self, unit: _Unit, events: list[_Event]) -> None:
        """A fatal event stops the run; the others (bad records, empty files) are warned and counted."""
        for ev in events:
            loc = self.location(unit, ev)
            if ev.fatal:
                raise DsTrainerError(f"{loc}: {ev.message}")
            if ev.kind == "empty_file":
                self.stats["empty_files_skipped"] += 1
                self.warn(f"{loc}: the file is empty; skipped")
            else:
                self.stats["bad_records_skipped"] += 1
                self.warn(f"{loc}: {ev.message}; skipped")

    def add_piece(self, part: _Part, tokens: np.ndarray | None, a: int, pos: int, tokenize: bool) -> None:
        """A piece of a long document (its tokens are tokens[a:pos]); the document is decided at its last."""
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

    # -- progress.json

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


def _unit_result(fut: Future) -> _Result:
    try:
        return fut.result()
    except DsTrainerError as e:
        # From a worker, the pool attaches the worker's traceback as the cause; the line is enough.
        raise DsTrainerError(str(e)) from None
    except BrokenProcessPool as e:
        raise DsTrainerError(
            f"a worker process died ({e}); out of memory? rerun the same command to resume "
            "(perhaps with fewer --workers)"
        ) from None
