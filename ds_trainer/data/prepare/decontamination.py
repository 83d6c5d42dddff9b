"""Decontamination: the word n-grams of evaluation texts, and whether a document contains one."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ds_trainer.data.prepare.cleaning import clean_text
from ds_trainer.data.prepare.inputs import InputFile, _read_file_bytes
from ds_trainer.data.prepare.options import PrepareOptions
from ds_trainer.errors import DsTrainerError

_WORD_RE = re.compile(r"\w+")


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
