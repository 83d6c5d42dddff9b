"""The GPT-2 tokenizer: r50k_base, <|endoftext|> between documents, a stable identity."""

from __future__ import annotations

import os
import subprocess
import sys

from ds_trainer import tokenizer
from ds_trainer.tokenizer import EOT_ID, decode, encode_documents, get_encoding, identity

# sha256 over r50k_base's ranks as identity() hashes them; checkpoints record it, so it must never drift.
R50K_RANKS_SHA256 = "675838ceb7ae704a1ecee70a1d90d5b5049643e7f8d0f67f1fb375ecd1ddf0ca"


def test_encoding_is_gpt2():
    enc = get_encoding()
    assert enc.name == "r50k_base"
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's ids


def test_encode_documents_ends_each_document_with_eot():
    enc = get_encoding()
    docs = ["Hello world", "", "The meaning of life"]
    ids = encode_documents(docs)
    expected = enc.encode_ordinary(docs[0]) + [EOT_ID] + [EOT_ID] + enc.encode_ordinary(docs[2]) + [EOT_ID]
    assert ids == expected
    assert encode_documents([]) == []


def test_special_token_text_is_not_an_eot():
    ids = encode_documents(["a <|endoftext|> b"])
    assert ids.count(EOT_ID) == 1 and ids[-1] == EOT_ID
    assert decode(ids[:-1]) == "a <|endoftext|> b"


def test_the_verdict_token_count(verdict_path):
    text = verdict_path.read_text(encoding="utf-8")
    assert len(get_encoding().encode_ordinary(text)) == 5145
    ids = encode_documents([text])
    assert len(ids) == 5146 and ids[-1] == EOT_ID
    assert decode(ids[:-1]) == text


def test_identity_is_stable():
    first = identity()
    recomputed = tokenizer.identity.__wrapped__()  # bypass the cache: hash the ranks again
    assert first == recomputed
    assert first["name"] == "r50k_base"
    assert first["vocab_size"] == 50257
    assert len(first["ranks_sha256"]) == 64
    int(first["ranks_sha256"], 16)  # hex
    assert first["ranks_sha256"] == R50K_RANKS_SHA256


def _load_in_fresh_process(cache_dir: str) -> subprocess.CompletedProcess:
    """get_encoding() in a new interpreter with every network route closed (proxies to a dead port)."""
    dead = "http://127.0.0.1:9"
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": cache_dir,
        **{k: dead for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")},
    }
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    code = (
        "from ds_trainer.errors import DsTrainerError\n"
        "from ds_trainer.tokenizer import get_encoding\n"
        "try:\n    print(get_encoding().encode_ordinary('Hello world'))\n"
        "except DsTrainerError as e:\n    print('error:', e)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_loads_offline_from_the_cache_folder():
    out = _load_in_fresh_process(os.environ["TIKTOKEN_CACHE_DIR"])
    assert out.stdout.strip() == "[15496, 995]", out.stderr[-2000:]


def test_missing_cache_file_offline_is_one_clear_error(tmp_path):
    out = _load_in_fresh_process(str(tmp_path))
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load the GPT-2 tokenizer (r50k_base)")
    assert "TIKTOKEN_CACHE_DIR" in lines[0]
    assert "Traceback" not in out.stderr
