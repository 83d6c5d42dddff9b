"""Small text corpora: files, folders or globs of text tokenised in memory into fixed windows."""

from __future__ import annotations

import glob
import importlib
import inspect
from pathlib import Path

import numpy as np
import torch

from ds_trainer.errors import DsTrainerError

# Docstrings of these standard-library modules make the built-in corpus: ~470 KB of English that
# every Python install carries, so the default run needs no download.
_BUILTIN_MODULES = [
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "doctest",
    "email",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "platform",
    "poplib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
    "zipimport",
]


def builtin_corpus() -> list[str]:
    """One document per standard-library module: its docstring and those of its public classes and functions."""
    docs = []
    for name in _BUILTIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a trimmed Python may lack one; the corpus is still plenty
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
        docs.append("\n\n".join(p for p in parts if p))
    return docs


def resolve_text_files(spec: str) -> list[Path]:
    """The files named by a file path, a folder (every *.txt below it) or a glob, in sorted order."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise DsTrainerError(
                f"data.path {spec}: folder holds no *.txt files; add text files or point elsewhere"
            )
        return files
    files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise DsTrainerError(
            f"data.path {spec}: no such file or folder, and no file matches it as a glob; fix --data.path"
        )
    return files


def load_text_documents(spec: str) -> list[str]:
    """Each file is one document; empty `spec` gives the built-in corpus."""
    if not spec:
        return builtin_corpus()
    docs = []
    for f in resolve_text_files(spec):
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DsTrainerError(f"data.path: {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not any(d.strip() for d in docs):
        raise DsTrainerError(f"data.path {spec}: the files hold no text")
    return docs


def split_train_val(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last `val_fraction` of the tokens is validation, so no window straddles the two."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


class TokenWindows:
    """Windows of context_length+1 tokens every `stride` tokens; item i is (inputs, next-token targets)."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int) -> None:
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        self.context_length = context_length
        self.stride = stride
        n = len(tokens) - (context_length + 1)
        self.num_windows = 0 if n < 0 else n // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        w = self.tokens[start : start + self.context_length + 1]
        return w[:-1], w[1:]

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self[i] for i in indices), strict=True)
        return torch.stack(xs), torch.stack(ys)


def text_datasets(
    path: str, context_length: int, stride: int, val_fraction: float, vocab_size: int
) -> tuple[TokenWindows, TokenWindows | None]:
    """Tokenise the corpus and cut it into train and validation windows; fails clearly on too little text."""
    from ds_trainer.tokenizer import encode_documents, get_encoding

    n_vocab = get_encoding().n_vocab
    if vocab_size < n_vocab:
        raise DsTrainerError(
            f"model.vocab_size {vocab_size} is smaller than the GPT-2 tokenizer's {n_vocab} tokens; set it to >= {n_vocab}"
        )
    tokens = np.asarray(encode_documents(load_text_documents(path)), dtype=np.int64)
    train, val = split_train_val(tokens, val_fraction)
    where = f"data.path {path}" if path else "the built-in corpus"
    window = context_length + 1
    if len(train) < window:
        raise DsTrainerError(
            f"{where} gives {len(train)} training tokens, fewer than one window of context_length+1 = {window}; "
            "add text or lower --data.context_length"
        )
    if val_fraction == 0:
        return TokenWindows(train, context_length, stride), None
    if len(val) < window:
        raise DsTrainerError(
            f"{where}: the validation split (data.val_fraction={val_fraction}) has {len(val)} tokens, fewer than one "
            f"window of {window}; raise data.val_fraction, lower data.context_length, or set data.val_fraction 0"
        )
    # Validation windows never overlap: each token is scored once.
    return TokenWindows(train, context_length, stride), TokenWindows(val, context_length, context_length)
