"""Prepare a text corpus into tokenised uint16 shards for pretraining (see docs/data_preparation.md).

python launch/prepare_data.py INPUT [INPUT ...] --out OUT [--val_fraction 0.005] [--seed 1234] [--workers N]
    [--shard_tokens N] [--text_field text] [--min_chars N] [--normalize NFC|NFKC|none] [--keep_control_chars]
    [--decontaminate EVALFILE ...] [--ngram 13] [--invalid_utf8 error|replace|skip] [--skip_bad_records]

INPUT: .txt files (one document each), .jsonl files (one document per line), their .gz versions, folders
(every such file below, sorted) or globs. Rerun the same command after an interruption to resume.
"""

import argparse
import sys

from ds_trainer.errors import DsTrainerError


def _parser() -> argparse.ArgumentParser:
    from ds_trainer.data.prepare.options import INVALID_UTF8_POLICIES, PrepareOptions

    defaults = PrepareOptions()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    parser.add_argument(
        "--out", required=True, help="output folder (created; resumed when it holds a preparation)"
    )
    parser.add_argument(
        "--val_fraction", type=float, default=defaults.val_fraction, help="share of documents for validation"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="fixes which documents are validation"
    )
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: every core)")
    parser.add_argument("--shard_tokens", type=int, default=defaults.shard_tokens, help="tokens per shard")
    parser.add_argument("--text_field", default=defaults.text_field, help="the text field of JSONL records")
    parser.add_argument(
        "--min_chars",
        type=int,
        default=defaults.min_chars,
        help="drop documents shorter than this (characters)",
    )
    parser.add_argument(
        "--normalize", default=defaults.normalize, help="Unicode normalisation: NFC, NFKC or none"
    )
    parser.add_argument(
        "--keep_control_chars",
        action="store_true",
        help="keep control characters (removed by default, but \\t \\n)",
    )
    parser.add_argument("--decontaminate", nargs="+", default=[], metavar="EVALFILE", help="evaluation texts")
    parser.add_argument(
        "--ngram", type=int, default=defaults.ngram, help="words per n-gram for --decontaminate"
    )
    parser.add_argument("--invalid_utf8", default=defaults.invalid_utf8, choices=INVALID_UTF8_POLICIES)
    parser.add_argument(
        "--skip_bad_records",
        action="store_true",
        help="skip (warn and count) bad JSONL lines and empty files",
    )
    parser.add_argument(
        "--unit_bytes",
        type=int,
        default=defaults.unit_bytes,
        help="input bytes per work unit; long documents are cut into pieces of this size (shapes their hash)",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from ds_trainer.data.prepare import prepare

        prepare(
            args.inputs,
            args.out,
            workers=args.workers,
            progress=not args.no_progress,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shard_tokens=args.shard_tokens,
            text_field=args.text_field,
            min_chars=args.min_chars,
            normalize=args.normalize,
            remove_control=not args.keep_control_chars,
            decontaminate=tuple(args.decontaminate),
            ngram=args.ngram,
            invalid_utf8=args.invalid_utf8,
            skip_bad_records=args.skip_bad_records,
            unit_bytes=args.unit_bytes,
        )
    except DsTrainerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
