"""Small text corpora (ds_trainer/data/text.py): token windows and window sets, the train/validation split,
loading text files, folders and globs, and the built-in corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_trainer.data import TokenWindows, WindowSet, builtin_corpus, load_text_documents, split_train_val
from ds_trainer.errors import DsTrainerError

# --- TokenWindows -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_tokens", "context", "stride", "starts"),
    [
        (20, 4, 4, [0, 4, 8, 12]),  # no overlap: window 4 would need tokens 16..20, one too many
        (20, 4, 2, [0, 2, 4, 6, 8, 10, 12, 14]),  # overlapping
        (21, 4, 4, [0, 4, 8, 12, 16]),  # the last window ends exactly at the end
        (5, 4, 4, [0]),  # exactly one window
        (4, 4, 4, []),  # shorter than context+1
        (10, 3, 100, [0]),
    ],
)
def test_token_windows(n_tokens, context, stride, starts):
    tokens = np.arange(100, 100 + n_tokens)
    windows = TokenWindows(tokens, context, stride)
    assert len(windows) == len(starts)
    for i, s in enumerate(starts):
        x, y = windows[i]
        assert x.dtype == torch.int64
        assert x.tolist() == list(range(100 + s, 100 + s + context))
        assert y.tolist() == list(range(101 + s, 101 + s + context))  # next-token targets


def test_window_set_batches_across_datasets():
    a = TokenWindows(np.arange(50), context_length=8, stride=8)
    b = TokenWindows(np.arange(1000, 1050), context_length=8, stride=4)
    windows = WindowSet([a, b], ["a", "b"])
    assert windows.sizes() == [len(a), len(b)]
    x, y = windows.batch([(0, 3), (1, 0), (0, 5), (1, 2)])
    assert x.shape == y.shape == (4, 8)
    assert x[:, 0].tolist() == [24, 1000, 40, 1008]
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert windows.eval_ids(0, 5) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]


@pytest.mark.parametrize(
    ("n", "fraction", "n_val"), [(100, 0.1, 10), (10, 0.25, 2), (10, 0.0, 0), (7, 0.5, 3)]
)
def test_split_train_val_takes_the_tail(n, fraction, n_val):
    tokens = np.arange(n)
    train, val = split_train_val(tokens, fraction)
    assert len(val) == n_val and len(train) == n - n_val
    assert np.array_equal(np.concatenate([train, val]), tokens)


# --- loading text -----------------------------------------------------------------------------------------


@pytest.fixture
def text_tree(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "notes.md").write_text("not text")
    return tmp_path


def test_load_file(text_tree):
    assert load_text_documents(str(text_tree / "b.txt")) == ["bee"]
    assert load_text_documents(str(text_tree / "notes.md")) == [
        "not text"
    ]  # a named file is read whatever its suffix


def test_load_folder_reads_every_txt_below_it_sorted(text_tree):
    assert load_text_documents(str(text_tree)) == ["ay", "bee", "sea"]


def test_load_glob(text_tree):
    assert load_text_documents(str(text_tree / "*.txt")) == ["ay", "bee"]
    assert load_text_documents(str(text_tree / "**" / "*.txt")) == ["ay", "bee", "sea"]


def test_load_errors(tmp_path):
    with pytest.raises(DsTrainerError, match="data.path .*no such file or folder"):
        load_text_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(DsTrainerError, match="folder holds no \\*.txt files"):
        load_text_documents(str(tmp_path))
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(DsTrainerError, match="hold no text"):
        load_text_documents(str(tmp_path))
    (tmp_path / "blank.txt").write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(DsTrainerError) as err:
        load_text_documents(str(tmp_path))
    assert str(err.value) == (
        f"data.path: {tmp_path / 'blank.txt'} is not UTF-8 text (invalid start byte at byte 3); fix the file, "
        "or prepare it with launch/prepare_data.py --invalid_utf8 replace and point data.path at the prepared folder"
    )


# The corpus includes typing's deprecated io/re namespaces, whose docstrings warn on Python 3.11.
@pytest.mark.filterwarnings("ignore:typing.(io|re) is deprecated:DeprecationWarning")
def test_builtin_corpus():
    docs = builtin_corpus()
    assert len(docs) > 50
    assert sum(len(d) for d in docs) > 100_000
    assert all(d.strip() for d in docs)
    assert builtin_corpus() == docs  # deterministic
    assert load_text_documents("") == docs
