"""The GPT-2 tokenizer: r50k_base, <|endoftext|> between documents, a stable identity."""

from __future__ import annotations

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
