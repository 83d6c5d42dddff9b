"""What a preparation reports: each split's metadata ({split}.json), its summary numbers and printout."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ds_trainer.data.prepare.decontamination import _EvalNgrams
from ds_trainer.data.prepare.options import PrepareOptions
from ds_trainer.data.prepare.out_dir import SPLITS
from ds_trainer.data.shards import FORMAT
from ds_trainer.tokenizer import identity

if TYPE_CHECKING:
    from ds_trainer.data.prepare.preparation import _Preparation


def split_metadata(run: _Preparation, split: str) -> dict:
    """`{split}.json`; its sources, cleaning, dedup and decontamination describe the whole run."""
    w = run.writers[split]
    opts = run.opts
    return {
        "format": FORMAT,
        "split": split,
        "dtype": "uint16",
        "tokens": w.tokens,
        "documents": run.docs[split],
        "shards": [{"file": s["file"], "tokens": s["tokens"], "sha256": s["sha256"]} for s in w.shards],
        "tokenizer": identity(),
        "max_token_id": max([s["max_token_id"] for s in w.shards], default=0),
        # Read from each file before any drop, both splits together (as in "cleaning"); named
        # documents_in so it is not taken for the split's count in "documents" above.
        "sources": [
            {"path": f.path, "documents_in": n, "bytes": f.size}
            for f, n in zip(run.files, run.source_docs, strict=True)
        ],
        "cleaning": _cleaning(run.stats, opts),
        "dedup": _dedup(run.stats),
        "decontamination": _decontamination(run.stats, opts, run.eval),
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "shard_tokens": opts.shard_tokens,
    }


def _cleaning(st: dict, opts: PrepareOptions) -> dict:
    return {
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
    }


def _dedup(st: dict) -> dict:
    return {
        "method": "exact: blake2b-128 of the cleaned UTF-8 text (of its pieces' hashes for a document "
        "cut into pieces); the first occurrence in input order is kept",
        "documents_checked": st["documents_in"]
        - st["dropped_invalid_utf8"]
        - st["dropped_empty"]
        - st["dropped_short"],
        "dropped_duplicate": st["dropped_duplicate"],
    }


def _decontamination(st: dict, opts: PrepareOptions, ev: _EvalNgrams | None) -> dict:
    return {
        "enabled": ev is not None,
        "files": ev.files if ev else [],
        "ngram": opts.ngram,
        "eval_documents": ev.documents if ev else 0,
        "eval_ngrams": len(ev.grams) if ev else 0,
        "words": r"lower-cased \w+ runs of the cleaned text",
        "dropped_contaminated": st["dropped_contaminated"],
    }


def summary_numbers(run: _Preparation, seconds: float) -> dict:
    """The numbers of the summary, returned by prepare() and kept in progress.json."""
    st = run.stats
    kept = sum(run.docs.values())
    return {
        "out": str(run.out),
        "documents_in": st["documents_in"],
        "documents_kept": kept,
        "documents": dict(run.docs),
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
        "tokens": {s: w.tokens for s, w in run.writers.items()},
        "shards": {s: len(w.shards) for s, w in run.writers.items()},
        "seconds": round(seconds, 3),
        "input_bytes": run.done_bytes,
        "tokenized_tokens": run.new_tokens,
        "tokens_per_second": round(run.new_tokens / max(seconds, 1e-9), 1),
        "resumed": {
            "shards": dict(run.resumed_shards),
            "tokens": run.resumed_tokens,
            "units_skipped": run.units_skipped,
            "units": run.units_total,
        }
        if run.units_done
        else None,
    }


def print_summary(s: dict, opts: PrepareOptions, out_stream) -> None:
    def p(line: str) -> None:
        print(line, file=out_stream, flush=True)

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
        done = "dropped" if opts.invalid_utf8 == "skip" else "kept with U+FFFD in place of the bad bytes"
        print(
            f"warning: {s['invalid_utf8_documents']:,} documents had invalid UTF-8; {done} "
            f"(--invalid_utf8 {opts.invalid_utf8})",
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
