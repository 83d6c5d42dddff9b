"""Corpus preparation: exact tokens, safe cuts of long documents, cleaning, dedup, decontamination, the
train/val split, bad input, and crash-safe resume (a real SIGKILL) with byte-identical shards."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import DATA, REPO

from ds_trainer.data import prepare as P
from ds_trainer.data.prepare import cutting, prepare, worker
from ds_trainer.data.prepare.cleaning import clean_text
from ds_trainer.data.prepare.cutting import cut_offsets
from ds_trainer.errors import DsTrainerError
from ds_trainer.tokenizer import EOT_ID, encode_documents, get_encoding, identity

SHAKESPEARE = DATA / "tinyshakespeare.txt"
LAUNCHER = REPO / "launch" / "prepare_data.py"


def run(inputs, out, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("val_fraction", 0.0)
    return prepare([str(i) for i in inputs], out, **kw)


def shard_tokens(out: Path, split: str = "train") -> np.ndarray:
    meta = json.loads((out / f"{split}.json").read_text())
    arrays = [np.fromfile(out / s["file"], dtype="<u2") for s in meta["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype="<u2")


def documents(out: Path, split: str = "train") -> list[str]:
    """The split's documents decoded back (each ends with an EOT)."""
    ids = shard_tokens(out, split).tolist()
    docs, cur = [], []
    for t in ids:
        if t == EOT_ID:
            docs.append(get_encoding().decode(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur
    return docs


def write_jsonl(path: Path, records, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: r} if isinstance(r, str) else r) + "\n" for r in records))
    return path


# --- exact tokens and safe cuts ------------------------------------------------------------------------------


def test_tinyshakespeare_two_workers_gives_tiktokens_of_the_whole_file(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    expected = get_encoding().encode_ordinary(text) + [EOT_ID]
    out = tmp_path / "out"
    # 64 KiB units: the single 1.1 MB document is cut into ~17 pieces tokenised by 2 worker processes.
    summary = run([SHAKESPEARE], out, workers=2, shard_tokens=50_000, unit_bytes=64 * 1024)
    assert shard_tokens(out).tolist() == expected
    meta = json.loads((out / "train.json").read_text())
    assert meta["format"] == "ds_trainer.tokens.v1" and meta["split"] == "train" and meta["dtype"] == "uint16"
    assert meta["tokens"] == len(expected) == summary["tokens"]["train"]
    assert meta["documents"] == 1 and meta["cleaning"]["documents_in"] == 1
    sizes = [s["tokens"] for s in meta["shards"]]
    assert len(sizes) == 7 and all(s == 50_000 for s in sizes[:-1]) and 0 < sizes[-1] <= 50_000
    assert [s["file"] for s in meta["shards"]] == [f"train_{i:06d}.bin" for i in range(7)]
    import hashlib

    for s in meta["shards"]:
        assert hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
    assert meta["max_token_id"] == max(expected)
    assert meta["tokenizer"] == identity()
    assert meta["sources"] == [
        {"path": str(SHAKESPEARE), "documents_in": 1, "bytes": SHAKESPEARE.stat().st_size}
    ]
    assert meta["seed"] == 1234 and meta["val_fraction"] == 0.0 and meta["shard_tokens"] == 50_000
    val = json.loads((out / "val.json").read_text())
    assert val["tokens"] == 0 and val["shards"] == [] and val["documents"] == 0
    assert val["sources"] == meta["sources"]  # the whole input's counts, the same in both splits
    assert not list(out.glob("*.tmp"))


def test_cut_points_tokenise_exactly_like_the_whole_text():
    data = SHAKESPEARE.read_bytes()
    cuts = cut_offsets(data, 16 * 1024)
    assert len(cuts) > 50
    for c in cuts:  # right after "\n", printable non-space ASCII before, an ASCII letter after
        assert data[c - 1 : c] == b"\n" and 0x21 <= data[c - 2] <= 0x7E and chr(data[c]).isalpha()
    enc = get_encoding()
    bounds = [0, *cuts, len(data)]
    pieces = [data[a:b].decode() for a, b in zip(bounds, bounds[1:], strict=False)]
    assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(data.decode())


@pytest.mark.parametrize("form", ["NFC", "NFKC"])
def test_cleaning_and_tokenising_pieces_equals_the_whole_on_tricky_text(form):
    """Random text full of whitespace runs, apostrophes, digits, accents, combining marks, control characters,
    compatibility characters and CJK: cleaning + tokenising the pieces at *every* legal cut point gives
    the tokens of the cleaned whole."""
    enc = get_encoding()
    alphabet = [
        "a", "Z", "q", " ", "  ", "\n", "\n\n", "\t", "\r\n", "'", "'s", "'ll", "3", "42", ".", ",", "!", "-",
        "e\u0301", "\u0301", "\u00e9", "\u00a0", "\u2000", "\u3000", "\ufb01", "\u2460", "\x00", "\x07", "\x85",
        "\u4e2d", "\u00df", "\U0001f600", "\u1100\u1161", "\u200b", "x\n", ".\n", "A", "b\nC",
    ]  # fmt: skip
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 80)))
        raw = text.encode()
        cuts = [m.end() for m in cutting._CUT_RE.finditer(raw)]
        if not cuts:
            continue
        whole = clean_text(text, form)[0]
        bounds = [0, *cuts, len(raw)]
        pieces = [clean_text(raw[a:b].decode(), form)[0] for a, b in zip(bounds, bounds[1:], strict=False)]
        assert "".join(pieces) == whole
        assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(whole)
        checked += 1
    assert checked > 100


def test_file_and_stream_cutting_agree_with_cut_offsets(tmp_path):
    rng = random.Random(1)
    words = ["alpha", "Beta", "x.", "12", "  ", "\n", "\nB", ".\nC", "\n\n", "é", "'s"]
    for trial in range(20):
        data = "".join(rng.choice(words) for _ in range(rng.randint(100, 3000))).encode()
        unit = rng.choice([64, 200, 1024])
        f = tmp_path / f"t{trial}.txt"
        f.write_bytes(data)
        cuts = cut_offsets(data, unit)
        assert cutting._file_cut_offsets(str(f), len(data), unit) == cuts
        stream = iter([data[i : i + 97] for i in range(0, len(data), 97)])
        pieces = list(cutting._stream_txt_pieces(lambda n, s=stream: next(s, b""), unit))
        bounds = [0, *cuts, len(data)]
        assert [p for p, _ in pieces] == [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        assert [last for _, last in pieces] == [False] * len(cuts) + [True]
        stream = iter([data[i : i + 97] for i in range(0, len(data), 97)])
        chunks = list(cutting._stream_line_chunks(lambda n, s=stream: next(s, b""), unit))
        ranges = cutting._file_line_ranges(str(f), len(data), unit)
        assert chunks == [data[a:b] for a, b in ranges] and b"".join(chunks) == data


# --- inputs ---------------------------------------------------------------------------------------------------


def test_folder_glob_jsonl_and_gzip_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Doc A from a text file.")
    write_jsonl(src / "sub" / "b.jsonl", [{"content": "Doc B1.", "id": 1}, {"content": "Doc B2.", "id": 2}])
    (src / "c.txt.gz").write_bytes(gzip.compress(b"Doc C, gzipped text."))
    (src / "d.jsonl.gz").write_bytes(gzip.compress(b'{"content": "Doc D1."}\n\n{"content": "Doc D2."}\n'))
    (src / "notes.md").write_text("not an input")
    out = tmp_path / "out"
    run([src], out, text_field="content")
    # sorted: a.txt, c.txt.gz, d.jsonl.gz, sub/b.jsonl
    expected = ["Doc A from a text file.", "Doc C, gzipped text.", "Doc D1.", "Doc D2.", "Doc B1.", "Doc B2."]
    assert shard_tokens(out).tolist() == encode_documents(expected)
    meta = json.loads((out / "train.json").read_text())
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "c.txt.gz", "d.jsonl.gz", "b.jsonl"]
    assert [s["documents_in"] for s in meta["sources"]] == [1, 1, 2, 2]

    out2 = tmp_path / "out2"
    run([str(src / "*.txt*"), str(src / "a.txt")], out2)  # a glob; a file named twice counts once
    assert documents(out2) == ["Doc A from a text file.", "Doc C, gzipped text."]

    with pytest.raises(DsTrainerError, match="no such file or folder, and no file matches it as a glob"):
        run([tmp_path / "missing.txt"], tmp_path / "out3")
    with pytest.raises(DsTrainerError, match="unsupported file type"):
        run([src / "notes.md"], tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


def test_big_files_cut_into_units_match_small_ones_and_dedup_across_containers(tmp_path):
    """Long .txt, .txt.gz and JSONL documents (cut into pieces across units) and a multi-unit JSONL file give
    the same tokens as whole-text tokenisation; the same text in three containers hashes the same."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    gz = tmp_path / "shakespeare.txt.gz"
    gz.write_bytes(gzip.compress(text.encode(), compresslevel=1))
    big_jsonl = write_jsonl(tmp_path / "big.jsonl", [text])
    paragraphs = [p for p in text.split("\n\n") if p.strip()][:400]
    many = write_jsonl(tmp_path / "many.jsonl", paragraphs)
    many_gz = tmp_path / "many_gz.jsonl.gz"
    many_gz.write_bytes(gzip.compress(many.read_bytes()))
    out = tmp_path / "out"
    summary = run([gz, SHAKESPEARE, big_jsonl, many, many_gz], out, unit_bytes=32 * 1024, workers=2)
    assert documents(out) == [text, *paragraphs]
    assert summary["dropped"]["duplicate"] == 2 + len(paragraphs)
    assert summary["documents_in"] == 3 + 2 * len(paragraphs)


# --- cleaning, dedup, decontamination -----------------------------------------------------------------------


def test_cleaning_dedup_and_min_chars(tmp_path):
    records = [
        "Hello world, first.",
        "a\x00b\x07c\r\nd\te\x85f",  # control characters go; \n and \t stay
        "Cafe\u0301 menu",  # NFC composes é
        "Hello world, first.",  # an exact duplicate
        "Cafe\u0301 menu\x01",  # a duplicate once cleaned
        "tiny",  # under min_chars
        "",  # empty
        "  \n\t ",  # only whitespace
        "<|endoftext|> is plain text here",
    ]
    f = write_jsonl(tmp_path / "docs.jsonl", records)
    out = tmp_path / "out"
    run([f], out, min_chars=5)
    kept = ["Hello world, first.", "abc\nd\tef", "Caf\u00e9 menu", "<|endoftext|> is plain text here"]
    assert shard_tokens(out).tolist() == encode_documents(kept)
    meta = json.loads((out / "train.json").read_text())
    c, d = meta["cleaning"], meta["dedup"]
    assert c["documents_in"] == 9 and meta["documents"] == 4
    assert c["control_chars_removed"] == 4 + 1 and c["documents_with_control_chars"] == 2
    assert c["normalized_documents"] == 2 and c["normalize"] == "NFC"
    assert c["dropped_short"] == 1 and c["dropped_empty"] == 2 and d["dropped_duplicate"] == 2

    out2 = tmp_path / "out2"
    run([f], out2, normalize="none", remove_control=False)
    assert documents(out2)[1] == "a\x00b\x07c\r\nd\te\x85f"
    assert "Cafe\u0301 menu" in documents(out2)


def _decontam_doc() -> tuple[bytes, int]:
    """A document > 1280 bytes whose only safe cut (unit 1024) falls inside the 13-gram of the eval text."""
    filler = "".join(
        f"{i:04d} filler words go here, again and again\n" for i in range(30)
    )  # digit-led: no cuts
    ngram_lines = "1 The quick brown fox jumps over the lazy dog.\nAnd then the cat sat on a mat\n"
    doc = filler + ngram_lines + filler
    return doc.encode(), len(filler) + ngram_lines.index("And")


def test_decontamination_drops_documents_sharing_an_ngram(tmp_path):
    ev = tmp_path / "eval.txt"
    ev.write_text("Q: the QUICK brown fox jumps over the lazy dog, and then the cat sat on a mat. A: yes")
    doc, cut = _decontam_doc()
    assert cut_offsets(doc, 1024) == [cut]  # the 13-gram "quick ... cat" spans the cut
    long_txt = tmp_path / "long.txt"
    long_txt.write_bytes(doc)
    records = [
        "Unrelated text about ships and sealing wax and cabbages and kings, twenty words long or so.",
        "Quick brown fox jumps over the lazy dog and then the cat sat",  # 13 words in a row: dropped
        "quick brown fox jumps over the lazy dog and then the cat",  # only 12: kept
        doc.decode(),  # the long document as one JSONL record (cut and checked in one worker)
    ]
    f = write_jsonl(tmp_path / "docs.jsonl", records)
    out = tmp_path / "out"
    run([long_txt, f], out, decontaminate=(str(ev),), unit_bytes=1024)  # long.txt: 2 pieces, 2 units
    assert documents(out) == [records[0], records[2]]
    dc = json.loads((out / "train.json").read_text())["decontamination"]
    # long.txt (2 pieces in 2 units: the n-gram is found across the cut) and record 1 are contaminated;
    # record 3 is long.txt again: a duplicate (same hash, whether cut across units or not).
    assert dc["enabled"] and dc["ngram"] == 13 and dc["dropped_contaminated"] == 2 and dc["eval_ngrams"] > 0
    assert json.loads((out / "train.json").read_text())["dedup"]["dropped_duplicate"] == 1
    s = run([f], tmp_path / "out1", decontaminate=(str(ev),), unit_bytes=1024)  # record 3 alone: contaminated
    assert documents(tmp_path / "out1") == [records[0], records[2]] and s["dropped"]["contaminated"] == 2
    out2 = tmp_path / "out2"
    run([long_txt, f], out2, decontaminate=(str(ev),), ngram=14, unit_bytes=1024)
    assert documents(out2) == records[:3]  # record 1 has only 13 words in a row; long.txt shares 14+


# --- the split -------------------------------------------------------------------------------------------------


def test_split_by_document_is_fixed_by_the_seed(tmp_path):
    docs = [f"Document number {i}: some words that differ {i * 7919 % 1000}." for i in range(2000)]
    fwd = write_jsonl(tmp_path / "fwd.jsonl", docs)
    rev = write_jsonl(tmp_path / "rev.jsonl", docs[::-1])

    def val_set(src, seed, name):
        run([src], tmp_path / name, val_fraction=0.1, seed=seed, shard_tokens=5_000)
        val, train = set(documents(tmp_path / name, "val")), set(documents(tmp_path / name, "train"))
        assert not val & train and len(val | train) == len(docs)
        return val

    a = val_set(fwd, 1, "a")
    assert val_set(rev, 1, "b") == a  # order-independent: by document, not by position
    assert 0.07 * len(docs) < len(a) < 0.13 * len(docs)
    assert val_set(fwd, 2, "c") != a
    meta = json.loads((tmp_path / "a" / "val.json").read_text())
    assert meta["documents"] == len(a) and meta["split"] == "val"


# --- bad input ---------------------------------------------------------------------------------------------------


def test_jsonl_errors_name_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "ok2",}\n{"other": "x"}\n{"text": 5}\n')
    with pytest.raises(DsTrainerError, match=rf"{bad}:3: not valid JSON .*--skip_bad_records"):
        run([bad], tmp_path / "o1")
    bad.write_text('{"text": "ok"}\n{"other": "x"}\n')
    with pytest.raises(DsTrainerError, match=rf"{bad}:2: no field 'text' \(keys: other\)"):
        run([bad], tmp_path / "o2")
    # in a JSONL file cut into several byte ranges, the line number is still right
    lines = [json.dumps({"text": f"record {i} " + "x" * 50}) for i in range(300)]
    lines[217] = '{"text": broken'
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines) + "\n")
    with pytest.raises(DsTrainerError, match=rf"{big}:218: not valid JSON"):
        run([big], tmp_path / "o3", unit_bytes=1024)
    assert not (tmp_path / "o3").exists()  # a failed new folder is removed again
    # skipping: warnings with file:line, and counts
    bad.write_text('{"text": "ok"}\n{"text": "ok2",}\n{"other": "x"}\n{"text": 5}\n[1]\n{"text": "ok3"}\n')
    summary = run([bad, big], tmp_path / "o4", skip_bad_records=True, unit_bytes=1024)
    err = capsys.readouterr().err
    assert f"warning: {bad}:2: not valid JSON" in err and f"warning: {big}:218: not valid JSON" in err
    assert f"{bad}:4: field 'text' is int" in err and f"{bad}:5: no field 'text' (a JSON list)" in err
    assert summary["bad_records_skipped"] == 5 and summary["documents_in"] == 2 + 299
    meta = json.loads((tmp_path / "o4" / "train.json").read_text())
    assert meta["cleaning"]["bad_records_skipped"] == 5


def test_invalid_utf8_policies(tmp_path, capsys):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"caf\xc3\xa9 ok then \xff bad")
    good = tmp_path / "good.txt"
    good.write_text("fine text")
    with pytest.raises(
        DsTrainerError, match=rf"{f}: not valid UTF-8 \(invalid start byte at byte 14\).*--invalid_utf8"
    ):
        run([good, f], tmp_path / "o1")
    s = run([good, f], tmp_path / "o2", invalid_utf8="replace")
    assert documents(tmp_path / "o2") == ["fine text", "caf\u00e9 ok then \ufffd bad"]
    assert json.loads((tmp_path / "o2" / "train.json").read_text())["cleaning"]["invalid_utf8_documents"] == 1
    assert s["invalid_utf8_documents"] == 1
    assert "warning: 1 documents had invalid UTF-8; kept with U+FFFD" in capsys.readouterr().err
    s = run([good, f], tmp_path / "o3", invalid_utf8="skip")
    assert documents(tmp_path / "o3") == ["fine text"] and s["dropped"]["invalid_utf8"] == 1
    assert "warning: 1 documents had invalid UTF-8; dropped (--invalid_utf8 skip)" in capsys.readouterr().err
    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "a"}\n{"text": "b\xfe"}\n')
    with pytest.raises(DsTrainerError, match=rf"{j}:2: not valid UTF-8"):
        run([j], tmp_path / "o4")
    s = run([j], tmp_path / "o5", invalid_utf8="skip")
    assert documents(tmp_path / "o5") == ["a"] and s["dropped"]["invalid_utf8"] == 1


def test_empty_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    empty_gz = tmp_path / "empty.txt.gz"
    empty_gz.write_bytes(gzip.compress(b""))
    good = tmp_path / "good.txt"
    good.write_text("some text")
    with pytest.raises(DsTrainerError, match=rf"{empty}: the file is empty.*--skip_bad_records"):
        run([good, empty], tmp_path / "o1")
    with pytest.raises(DsTrainerError, match=rf"{empty_gz}: the file is empty"):
        run([good, empty_gz], tmp_path / "o2")
    s = run([good, empty, empty_gz], tmp_path / "o3", skip_bad_records=True)
    assert s["empty_files_skipped"] == 2 and documents(tmp_path / "o3") == ["some text"]
    assert "warning:" in capsys.readouterr().err


def _gz_error(path: Path, reason: str) -> str:
    return f"{path}: not a valid gzip file ({reason}); replace it with a complete copy, or leave it out of the inputs"


def test_truncated_or_foreign_gzip_is_one_line_with_the_fix(tmp_path):
    text = SHAKESPEARE.read_bytes()[:200_000]
    cut = gzip.compress(text)
    ended = "Compressed file ended before the end-of-stream marker was reached"
    small = tmp_path / "small.txt.gz"  # read whole in a worker process
    small.write_bytes(cut[: len(cut) // 2])
    with pytest.raises(DsTrainerError) as err:
        run([small], tmp_path / "o1", workers=2, unit_bytes=1 << 20)
    assert str(err.value) == _gz_error(small, ended)
    big = tmp_path / "big.jsonl.gz"  # streamed into units by the main process
    big.write_bytes(gzip.compress(json.dumps({"text": text.decode()}).encode() + b"\n")[:-2000])
    with pytest.raises(DsTrainerError) as err:
        run([big], tmp_path / "o2", unit_bytes=4096)
    assert str(err.value) == _gz_error(big, ended)
    foreign = tmp_path / "plain.txt.gz"
    foreign.write_bytes(b"plain text, never compressed")
    with pytest.raises(DsTrainerError) as err:
        run([foreign], tmp_path / "o3")
    assert str(err.value) == _gz_error(foreign, "Not a gzipped file (b'pl')")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # failed new folders are removed


@pytest.mark.parametrize(("size", "where"), [(3_000, "worker"), (30_000, "main")])
def test_unreadable_input_is_one_error_line_from_worker_or_main_process(
    tmp_path, monkeypatch, capfd, size, where
):
    """An input that stops being a readable file after it was listed (here: replaced by a folder, which
    fails even for root). A small file is read by a worker process, a big one first by the main process
    (to plan its cut points); either way the launcher prints one line and no traceback."""
    good, gone = tmp_path / "good.txt", tmp_path / "gone.txt"
    good.write_text("Some text.")
    gone.write_text("Words and more words.\n" * (size // 22))
    real_resolve = P.resolve_inputs

    def resolve_then_swap(specs, what="input"):
        files = real_resolve(specs, what)
        gone.unlink()
        gone.mkdir()
        return files

    monkeypatch.setattr(P, "resolve_inputs", resolve_then_swap)
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import prepare_data
    finally:
        sys.path.remove(str(REPO / "launch"))
    out = tmp_path / "out"
    args = [
        str(good),
        str(gone),
        "--out",
        str(out),
        "--workers",
        "2",
        "--unit_bytes",
        "4096",
        "--no_progress",
    ]
    assert prepare_data.main(args) == 2
    cap = capfd.readouterr()
    assert "Traceback" not in cap.out + cap.err
    assert cap.err.splitlines() == [
        f"error: {gone}: cannot be read (Is a directory); make it a readable file, or leave it out of the inputs"
    ]
    assert not out.exists()


def test_out_that_cannot_be_a_folder_is_one_line_with_the_fix(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("Some words to prepare.")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # Under a regular file no folder can be made, whoever runs the test (root too).
    with pytest.raises(DsTrainerError) as err:
        run([src], blocker / "out")
    assert (
        str(err.value)
        == f"--out {blocker / 'out'}: cannot create the folder (Not a directory); choose another --out"
    )
    with pytest.raises(DsTrainerError) as err:
        run([src], blocker)
    assert str(err.value) == f"--out {blocker}: exists and is not a folder; choose another --out"
    assert blocker.read_text() == "x"


def test_no_room_for_a_shard_is_one_error_line_then_the_same_command_completes(tmp_path):
    """A real write error from the OS: the launcher runs under a 200 kB file size limit (EFBIG, as a full
    disk gives ENOSPC) and the first 676 kB shard cannot be written."""
    out = tmp_path / "out"
    args = [sys.executable, str(LAUNCHER), str(SHAKESPEARE), "--out", str(out), "--workers", "0"]
    args += ["--val_fraction", "0", "--no_progress"]

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run(
        args, capture_output=True, text=True, cwd=REPO, timeout=120, preexec_fn=limit_file_size
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {out / 'train_000000.bin.tmp'}: cannot be written (File too large); free disk space "
        "(or raise the quota or file size limit), then rerun the same command to resume"
    ]
    assert not out.exists()  # nothing was committed: the new folder is removed again
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = get_encoding().encode_ordinary(SHAKESPEARE.read_text(encoding="utf-8")) + [EOT_ID]
    assert shard_tokens(out).tolist() == expected


# --- the output folder ---------------------------------------------------------------------------------------------


def test_already_prepared_different_options_and_foreign_folders(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("Some words to prepare.")
    out = tmp_path / "out"
    run([src], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    s = run([src], out)
    assert s["already_prepared"] and "already prepared" in capsys.readouterr().out
    with pytest.raises(
        DsTrainerError, match=r"finished preparation made with different options \(seed 1234 → 7\)"
    ):
        run([src], out, seed=7)
    src.write_text("Changed words.")
    with pytest.raises(DsTrainerError, match="inputs"):
        run([src], out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.me").write_text("x")
    with pytest.raises(DsTrainerError, match="not empty and holds no progress.json"):
        run([src], foreign)
    assert os.listdir(foreign) == ["keep.me"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_rerun_rewrites_damaged_split_metadata(tmp_path, capsys, damage):
    src = tmp_path / "a.txt"
    src.write_text("Some words to prepare.")
    out = tmp_path / "out"
    run([src], out)
    before = {s: (out / f"{s}.json").read_bytes() for s in ("train", "val")}
    if damage == "truncate":
        (out / "train.json").write_bytes(before["train"][:40])
    else:
        (out / "val.json").unlink()
    assert run([src], out)["already_prepared"]
    assert {s: (out / f"{s}.json").read_bytes() for s in ("train", "val")} == before
    assert "already prepared" in capsys.readouterr().out


def test_progress_bar_and_summary(tmp_path, capsys):
    run([SHAKESPEARE], tmp_path / "out", progress=True, unit_bytes=128 * 1024)
    cap = capsys.readouterr()
    assert "MB/s" in cap.err and "tok/s" in cap.err and "eta" in cap.err and "100.0%" in cap.err
    assert "documents: 1 in, 1 kept" in cap.out and "train: 338,026 tokens in 1 shard" in cap.out


# --- crash and resume: a real SIGKILL ------------------------------------------------------------------------------


def launcher(args, env=None, **kw):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(LAUNCHER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=REPO,
        start_new_session=True,
        **kw,
    )


def test_sigkill_midway_then_rerun_gives_identical_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")
    n = 30
    for i in range(n):  # 30 documents, 2 per 64 KiB work unit: 15 units, ~18k tokens each
        (src / f"part{i:02d}.txt").write_text(text[i * len(text) // n : (i + 1) * len(text) // n])
    opts = ["--workers", "2", "--shard_tokens", "20000", "--unit_bytes", "65536", "--val_fraction", "0.2"]
    out = tmp_path / "out"
    # The test hook makes each worker sleep 0.4 s per unit, so the kill lands midway.
    proc = launcher([str(src), "--out", str(out), *opts], env={worker.SLOW_UNITS_ENV: "0.4"})
    progress = out / "progress.json"
    committed = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, json.JSONDecodeError, KeyError):
                committed = len(json.loads(progress.read_text())["splits"]["train"]["shards"])
            if committed >= 2:
                break
            time.sleep(0.05)
        assert committed >= 2 and proc.poll() is None, (
            proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
        )
        os.kill(proc.pid, signal.SIGKILL)  # only the main process: its workers die with it (PR_SET_PDEATHSIG)
        proc.wait(10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert not (out / "train.json").exists() and not (out / "val.json").exists()
    state = json.loads(progress.read_text())
    assert not state["done"] and 0 < state["units_done"] < 15

    rerun = launcher([str(src), "--out", str(out), *opts])
    log = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == 0, log
    done_tokens = sum(s["tokens"] for sp in state["splits"].values() for s in sp["shards"]) + sum(
        sp["partial_tokens"] for sp in state["splits"].values()
    )
    shards = len(state["splits"]["train"]["shards"]) + len(state["splits"]["val"]["shards"])
    assert f"resumed: {shards} shards already committed" in log, log
    assert f"{state['units_done']} of 15 work units were re-read but not re-tokenised" in log, log
    total = sum(json.loads((out / f"{s}.json").read_text())["tokens"] for s in ("train", "val"))
    assert f"{total - done_tokens:,} tokens tokenised this run" in log, log

    ref = tmp_path / "ref"  # uninterrupted, in this process: the output does not depend on the workers
    run([src], ref, shard_tokens=20_000, unit_bytes=65536, val_fraction=0.2)
    names = sorted(p.name for p in ref.iterdir() if p.name != "progress.json")
    assert sorted(p.name for p in out.iterdir() if p.name != "progress.json") == names
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert documents(out, "val") and documents(out, "train")


def test_launcher_bad_input_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nope: no such file or folder" in errors[0], proc.stderr


def test_launcher_main_reports_errors_in_process(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import prepare_data
    finally:
        sys.path.remove(str(REPO / "launch"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    assert prepare_data.main([str(bad), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and f"{bad}:1: no field 'text'" in err
    assert prepare_data.main([str(bad), "--out", str(tmp_path / "o"), "--val_fraction", "2"]) == 2
    assert "--val_fraction 2.0: must be between 0 and 1" in capsys.readouterr().err


class _Crash(BaseException):
    pass


def test_crash_after_a_shard_rename_before_its_checkpoint_resumes_identically(tmp_path, monkeypatch):
    """The worst moments to die: shards renamed to .bin but not yet in progress.json, and bytes in the .tmp
    file past the recorded count. The rerun takes the shard back, truncates, and ends byte-identical."""
    docs = [
        f"Paragraph {i}. " + "All the world's a stage, and all the men and women merely players. " * 3
        for i in range(400)
    ]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    kw = dict(shard_tokens=3_000, unit_bytes=4096, val_fraction=0.3)
    ref = tmp_path / "ref"
    run([src], ref, **kw)

    real_checkpoint = P._Preparation.checkpoint
    calls = []

    def crashing_checkpoint(self, units_done):
        calls.append(units_done)
        if len(calls) == 3:  # shards completed since the last checkpoint are already renamed to .bin
            raise _Crash
        real_checkpoint(self, units_done)

    out = tmp_path / "out"
    monkeypatch.setattr(P._Preparation, "checkpoint", crashing_checkpoint)
    with pytest.raises(_Crash):
        run([src], out, **kw)
    monkeypatch.undo()
    state = json.loads((out / "progress.json").read_text())
    recorded = {
        f"{s}_{len(sp['shards']):06d}.bin" for s, sp in state["splits"].items() if sp["partial_tokens"]
    }
    assert recorded & {p.name for p in out.glob("*.bin")}, "no renamed-but-unrecorded shard to take back"
    for tmp in out.glob("*.bin.tmp"):
        with open(tmp, "ab") as fh:
            fh.write(b"junk past the checkpoint")
    summary = run([src], out, **kw)
    assert summary["resumed"]["units_skipped"] == state["units_done"] > 0
    names = sorted(p.name for p in ref.iterdir() if p.name != "progress.json")
    assert sorted(p.name for p in out.iterdir() if p.name != "progress.json") == names
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
