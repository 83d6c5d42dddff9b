"""From data settings to window sets (ds_trainer/data/datasets.py): text in memory, prepared shards
memory-mapped (also covers ds_trainer/data/shards.py, the shard and metadata reader), and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiktoken

from ds_trainer.data import TokenShards, build_datasets, is_prepared
from ds_trainer.errors import DsTrainerError
from ds_trainer.tokenizer import EOT_ID, encode_documents, identity


def n_windows(n_tokens: int, context: int, stride: int) -> int:
    return max(0, (n_tokens - context - 1) // stride + 1)


def write_prepared(folder, splits: dict[str, list[np.ndarray]], tokenizer: dict | None = None) -> None:
    """Shards and metadata in the format launch/prepare_data.py writes."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, shards in splits.items():
        entries = []
        for i, arr in enumerate(shards):
            name = f"{split}_{i:06d}.bin"
            arr.astype(np.uint16).tofile(folder / name)
            entries.append({"file": name, "tokens": len(arr), "sha256": ""})
        tokens = sum(len(a) for a in shards)
        meta = {
            "format": "ds_trainer.tokens.v1",
            "split": split,
            "dtype": "uint16",
            "tokens": tokens,
            "documents": 1,
            "shards": entries,
            "tokenizer": tokenizer or identity(),
            "max_token_id": int(max((a.max() for a in shards if len(a)), default=0)),
        }
        (folder / f"{split}.json").write_text(json.dumps(meta))


def test_text_source_splits_train_and_validation(verdict_path):
    train, val, weights = build_datasets({str(verdict_path): 1.0}, 32, 16, 0.1, 50257)
    tokens = encode_documents([verdict_path.read_text(encoding="utf-8")])
    n_val = int(len(tokens) * 0.1)
    assert weights == [1.0]
    assert train.sizes() == [n_windows(len(tokens) - n_val, 32, 16)]
    assert val.sizes() == [n_windows(n_val, 32, 32)]  # validation windows never overlap
    assert train.parts[0][0][0].tolist() == tokens[:32]
    assert val.parts[0][0][0].tolist() == tokens[len(tokens) - n_val :][:32]
    _, no_val, _ = build_datasets({str(verdict_path): 1.0}, 64, 64, 0.0, 50257)
    assert no_val is None


def test_text_folder_source_reads_every_txt_below_it_sorted(tmp_path, verdict_path):
    text = verdict_path.read_text(encoding="utf-8")
    third = len(text) // 3
    parts = [text[:third], text[third : 2 * third], text[2 * third :]]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    # Written out of order, one nested, one not *.txt: the documents are the sorted *.txt files below.
    (folder / "sub" / "c.txt").write_text(parts[2], encoding="utf-8")
    (folder / "b.txt").write_text(parts[1], encoding="utf-8")
    (folder / "a.txt").write_text(parts[0], encoding="utf-8")
    (folder / "notes.md").write_text("not part of the corpus")
    enc = tiktoken.get_encoding("r50k_base")
    expected = [t for part in parts for t in [*enc.encode_ordinary(part), EOT_ID]]
    n_val = int(len(expected) * 0.2)
    train_tokens, val_tokens = expected[: len(expected) - n_val], expected[len(expected) - n_val :]

    train, val, weights = build_datasets({str(folder): 1.0}, 16, 8, 0.2, 50257)
    assert weights == [1.0] and train.names == [str(folder)]
    assert train.sizes() == [n_windows(len(train_tokens), 16, 8)] and train.sizes()[0] > 100
    assert val.sizes() == [n_windows(len(val_tokens), 16, 16)]
    for i in range(train.sizes()[0]):
        x, y = train.parts[0][i]
        assert x.tolist() == train_tokens[8 * i : 8 * i + 16]
        assert y.tolist() == train_tokens[8 * i + 1 : 8 * i + 17]
    for i in range(val.sizes()[0]):
        x, y = val.parts[0][i]
        assert x.tolist() == val_tokens[16 * i : 16 * i + 16]
        assert y.tolist() == val_tokens[16 * i + 1 : 16 * i + 17]


def test_text_source_errors(tmp_path, verdict_path):
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    with pytest.raises(DsTrainerError, match="fewer than one window of context_length\\+1 = 33"):
        build_datasets({str(short): 1.0}, 32, 32, 0.0, 50257)
    with pytest.raises(DsTrainerError, match="validation split .* fewer than one window"):
        build_datasets({str(verdict_path): 1.0}, 32, 32, 0.001, 50257)
    with pytest.raises(DsTrainerError, match="model.vocab_size 1000 is smaller than .* 50257"):
        build_datasets({str(verdict_path): 1.0}, 32, 32, 0.1, 1000)


def test_prepared_shards_read_as_one_sequence(tmp_path):
    shards = [np.arange(0, 10), np.arange(10, 25), np.arange(25, 31)]
    write_prepared(tmp_path / "ds", {"train": shards, "val": [np.arange(100, 140)]})
    assert is_prepared(tmp_path / "ds") and not is_prepared(tmp_path)
    seq = TokenShards(tmp_path / "ds", "train", identity(), 50257)
    assert len(seq) == 31
    assert seq[8:27].tolist() == list(range(8, 27))  # crosses two shard boundaries
    assert seq[10:25].tolist() == list(range(10, 25))
    train, val, _ = build_datasets({str(tmp_path / "ds"): 1.0}, 4, 4, None, 50257)
    assert train.sizes() == [n_windows(31, 4, 4)]
    x, y = train.batch([(0, 2)])
    assert x.tolist() == [[8, 9, 10, 11]] and y.tolist() == [[9, 10, 11, 12]]
    assert val.sizes() == [n_windows(40, 4, 4)]  # a prepared folder brings its own validation split


def test_prepared_shards_refuse_other_tokenizer_vocab_and_broken_files(tmp_path):
    other = {**identity(), "ranks_sha256": "0" * 64, "name": "cl100k_base"}
    write_prepared(tmp_path / "tok", {"train": [np.arange(50)], "val": [np.arange(0)]}, tokenizer=other)
    with pytest.raises(DsTrainerError, match="made with tokenizer cl100k_base.*prepare the data again"):
        build_datasets({str(tmp_path / "tok"): 1.0}, 4, 4, None, 50257)
    write_prepared(tmp_path / "big", {"train": [np.array([1, 2, 60000, 3, 4, 5])], "val": [np.arange(0)]})
    with pytest.raises(DsTrainerError, match="token id 60000 is beyond the model's vocabulary of 50257"):
        build_datasets({str(tmp_path / "big"): 1.0}, 4, 4, None, 50257)
    write_prepared(tmp_path / "cut", {"train": [np.arange(50), np.arange(50)], "val": [np.arange(0)]})
    with open(tmp_path / "cut" / "train_000001.bin", "r+b") as f:
        f.truncate(30)
    with pytest.raises(DsTrainerError, match="train_000001.bin: expected 50 tokens .* found 30 bytes"):
        build_datasets({str(tmp_path / "cut"): 1.0}, 4, 4, None, 50257)
    write_prepared(tmp_path / "tiny", {"train": [np.arange(3)], "val": [np.arange(0)]})
    with pytest.raises(DsTrainerError, match="train split\\) has 3 tokens, fewer than one window"):
        build_datasets({str(tmp_path / "tiny"): 1.0}, 4, 4, None, 50257)


def test_mixture_of_a_prepared_folder_and_text(tmp_path, verdict_path):
    write_prepared(tmp_path / "ds", {"train": [np.arange(400)], "val": [np.arange(0)]})
    train, val, weights = build_datasets(
        {str(tmp_path / "ds"): 0.7, str(verdict_path): 0.3}, 8, 8, 0.1, 50257
    )
    assert weights == [0.7, 0.3] and len(train.sizes()) == 2
    assert val.sizes() == [n_windows(int(5146 * 0.1), 8, 8)]  # only the text source has a validation split


def test_val_fraction_is_refused_for_prepared_folders_only(tmp_path, verdict_path):
    write_prepared(tmp_path / "ds", {"train": [np.arange(400)], "val": [np.arange(0)]})
    with pytest.raises(DsTrainerError, match="data.val_fraction=0.2 does not apply to prepared folders"):
        build_datasets({str(tmp_path / "ds"): 1.0}, 8, 8, 0.2, 50257)
    _, val, _ = build_datasets({str(verdict_path): 1.0}, 8, 8, None, 50257)  # text: default 0.1
    assert val.sizes() == [n_windows(int(5146 * 0.1), 8, 8)]


def test_unfinished_preparation_is_named_as_such(tmp_path):
    """A folder where launch/prepare_data.py was interrupted: progress.json and shards, no train.json."""
    out = tmp_path / "web"
    out.mkdir()
    (out / "progress.json").write_text(
        json.dumps({"format": "ds_trainer.prepare.progress.v1", "done": False})
    )
    np.arange(100, dtype=np.uint16).tofile(out / "train_000000.bin.tmp")
    with pytest.raises(DsTrainerError) as err:
        build_datasets({str(out): 1.0}, 4, 4, None, 50257)
    assert str(err.value) == (
        f"{out}: the preparation in this folder did not finish (no train.json); "
        "rerun the same launch/prepare_data.py command to complete it"
    )
    write_prepared(tmp_path / "done", {"train": [np.arange(40)], "val": [np.arange(0)]})
    with pytest.raises(DsTrainerError, match=f"^{out}: the preparation in this folder did not finish"):
        build_datasets({str(tmp_path / "done"): 0.5, str(out): 0.5}, 4, 4, None, 50257)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            b'{"format": "ds_trainer.tokens.v1", "tokens": 4',
            "Expecting ',' delimiter: line 1 column 47 (char 46)",
        ),
        (b"", "Expecting value: line 1 column 1 (char 0)"),
        (b"\xff\xfe{}", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    ],
)
def test_damaged_split_metadata_is_one_line_with_the_fix(tmp_path, content, reason):
    write_prepared(tmp_path / "ds", {"train": [np.arange(40)], "val": [np.arange(40)]})
    (tmp_path / "ds" / "train.json").write_bytes(content)
    assert is_prepared(tmp_path / "ds")
    with pytest.raises(DsTrainerError) as err:
        build_datasets({str(tmp_path / "ds"): 1.0}, 4, 4, None, 50257)
    assert str(err.value) == (
        f"{tmp_path / 'ds' / 'train.json'}: damaged, not valid JSON ({reason}); rerun the same "
        "launch/prepare_data.py command to rewrite it, or prepare the data again"
    )


def test_split_metadata_that_is_not_an_object_is_refused(tmp_path):
    write_prepared(tmp_path / "ds", {"train": [np.arange(40)], "val": [np.arange(40)]})
    (tmp_path / "ds" / "val.json").write_text("[1, 2]")
    with pytest.raises(DsTrainerError, match=r"val.json: format None is not 'ds_trainer.tokens.v1'"):
        build_datasets({str(tmp_path / "ds"): 1.0}, 4, 4, None, 50257)
