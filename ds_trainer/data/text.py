"""Small text corpora: files, folders or globs of text tokenised in memory into fixed windows."""

from __future__ import annotations

import glob
import importlib
import inspect
import warnings
from pathlib import Path

import numpy as np
import torch

from ds_trainer.data.shards import TokenShards
from ds_trainer.errors import DsTrainerError

# Docstrings of these standard-library modules make the built-in corpus: ~410 KB of English that
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
        with warnings.catch_warnings():  # typing's deprecated io/re namespaces warn when touched
            warnings.simplefilter("ignore", DeprecationWarning)
            members = sorted(vars(module).items())
        for attr, obj in members:
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
            raise DsTrainerError(
                f"data.path: {f} is not UTF-8 text ({e.reason} at byte {e.start}); fix the file, or prepare it "
                "with launch/prepare_data.py --invalid_utf8 replace and point data.path at the prepared folder"
            ) from None
        except OSError as e:
            raise DsTrainerError(
                f"data.path: {f} cannot be read ({e.strerror or e}); make it readable, or point data.path elsewhere"
            ) from None
    if not any(d.strip() for d in docs):
        raise DsTrainerError(f"data.path {spec}: the files hold no text")
    return docs


def split_train_val(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last `val_fraction` of the tokens is validation, so no window straddles the two."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


class TokenWindows:
    """Windows of context_length+1 tokens every `stride` tokens; item i is (inputs, next-token targets).

    `tokens` is anything sliceable into a NumPy array: an in-memory array or memory-mapped TokenShards.
    """

    def __init__(self, tokens: np.ndarray | TokenShards, context_length: int, stride: int) -> None:
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride
        n = len(tokens) - (context_length + 1)
        self.num_windows = 0 if n < 0 else n // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        w = torch.from_numpy(self.tokens[start : start + self.context_length + 1].astype(np.int64))
        return w[:-1], w[1:]


class WindowSet:
    """One or more TokenWindows (a mixture's datasets); samples are addressed as (dataset, window)."""

    def __init__(self, parts: list[TokenWindows], names: list[str]) -> None:
        self.parts = parts
        self.names = names
        self.context_length = parts[0].context_length

    def sizes(self) -> list[int]:
        return [len(p) for p in self.parts]

    def batch(self, ids: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.parts[d][w] for d, w in ids), strict=True)
        return torch.stack(xs), torch.stack(ys)

    def eval_ids(self, start: int, count: int) -> list[tuple[int, int]]:
        """Validation samples start…start+count, taken round-robin over the datasets, wrapping around."""
        out, d_count = [], len(self.parts)
        for i in range(start, start + count):
            d = i % d_count
            out.append((d, (i // d_count) % len(self.parts[d])))
        return out


def text_tokens(path: str, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise a small corpus in memory: (train tokens, validation tokens), the latter its last `val_fraction`."""
    from ds_trainer.tokenizer import encode_documents

    tokens = np.asarray(encode_documents(load_text_documents(path)), dtype=np.int64)
    return split_train_val(tokens, val_fraction)
