"""Corpus preparation: text and JSONL files (optionally gzip) → cleaned, deduplicated, split, tokenised shards.

Output format, pipeline, long-document cutting, resume and errors: see docs/data_preparation.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ds_trainer.data.prepare.decontamination import _load_eval
from ds_trainer.data.prepare.inputs import InputFile, resolve_inputs
from ds_trainer.data.prepare.options import PrepareOptions
from ds_trainer.data.prepare.out_dir import (
    PROGRESS_FORMAT,
    _metadata_intact,
    _option_differences,
    _OutDir,
    _remove_our_files,
    _write_metadata,
)
from ds_trainer.data.prepare.preparation import _Preparation
from ds_trainer.data.shards import FORMAT
from ds_trainer.errors import DsTrainerError
from ds_trainer.tokenizer import identity


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
    """Prepare `inputs` into shards in `out` (see docs/data_preparation.md); resumes an interrupted run.

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
    files, eval_files, empty = _resolve(inputs, opts)
    record = _options_record(files, eval_files, opts)
    fingerprint = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    out_path = Path(out)
    od = _OutDir(out_path)
    try:
        state = od.open()
        if state is not None:
            _check_same_options(out_path, state, record, fingerprint)
            if state.get("done"):
                return _already_prepared(out_path, state["final"], out_stream)
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


def _resolve(
    inputs: Sequence[str | os.PathLike], opts: PrepareOptions
) -> tuple[list[InputFile], list[InputFile], list[InputFile]]:
    """(input files, --decontaminate files, empty input files: refused, or warned about)."""
    files = resolve_inputs(inputs)
    eval_files = resolve_inputs(opts.decontaminate, "--decontaminate") if opts.decontaminate else []
    empty = [f for f in files if f.size == 0]
    if empty and not opts.skip_bad_records:
        raise DsTrainerError(f"{empty[0].path}: the file is empty; remove it or pass --skip_bad_records")
    for f in empty:
        print(f"warning: {f.path}: the file is empty; skipped", file=sys.stderr, flush=True)
    return files, eval_files, empty


def _files_digest(fs: list[InputFile]) -> str:
    listing = json.dumps([[f.path, f.size, f.mtime_ns] for f in fs])
    return f"{len(fs)} files, sha256 {hashlib.sha256(listing.encode()).hexdigest()}"


def _options_record(files: list[InputFile], eval_files: list[InputFile], opts: PrepareOptions) -> dict:
    """What shapes the output, fingerprinted; stored in progress.json (rewritten at each checkpoint), so
    the file lists only as digests."""
    return {
        "format": FORMAT,
        "tokenizer": identity()["ranks_sha256"],
        "inputs": _files_digest(files),
        "decontaminate": _files_digest(eval_files),
        **{k: v for k, v in asdict(opts).items() if k != "decontaminate"},
    }


def _check_same_options(out_path: Path, state: dict, record: dict, fingerprint: str) -> None:
    """Refuses a folder holding a preparation made with other options (or by another format)."""
    if state.get("format") != PROGRESS_FORMAT or state.get("fingerprint") != fingerprint:
        finished = (out_path / "train.json").is_file()
        what = "a finished preparation" if finished else "an unfinished preparation"
        raise DsTrainerError(
            f"--out {out_path} holds {what} made with different options "
            f"({_option_differences(state.get('options') or {}, record)}); nothing was changed: "
            "rerun with the original options, or choose another --out"
        )


def _already_prepared(out_path: Path, final: dict, out_stream) -> dict:
    """A finished folder: its metadata rewritten from progress.json if missing or damaged, its summary."""
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
