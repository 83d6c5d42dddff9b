"""The GPT-2 tokenizer (tiktoken's `r50k_base`) and its identity."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import lru_cache

import tiktoken

from ds_trainer.errors import DsTrainerError

# tiktoken's own "gpt2" needs two extra files that are not available offline; r50k_base has
# exactly GPT-2's ranks, split pattern and <|endoftext|> id.
ENCODING_NAME = "r50k_base"
EOT_ID = 50256


@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    try:
        enc = tiktoken.get_encoding(ENCODING_NAME)
    except Exception as e:  # tiktoken raises plain requests/OS errors when offline
        raise DsTrainerError(
            f"cannot load the GPT-2 tokenizer ({ENCODING_NAME}): {type(e).__name__}: {e}; "
            "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached r50k_base file, or allow network access"
        ) from None
    if enc.eot_token != EOT_ID:
        raise DsTrainerError(
            f"tokenizer {ENCODING_NAME} has <|endoftext|>={enc.eot_token}, expected {EOT_ID}"
        )
    return enc


def encode_documents(texts: Iterable[str]) -> list[int]:
    """Token ids of the documents, each followed by <|endoftext|> so documents never run together."""
    enc = get_encoding()
    out: list[int] = []
    for ids in enc.encode_ordinary_batch(list(texts)):
        out.extend(ids)
        out.append(EOT_ID)
    return out


def decode(ids: Iterable[int]) -> str:
    return get_encoding().decode(list(ids))


@lru_cache(maxsize=1)
def identity() -> dict:
    """Name and checksum of the ranks, so data and checkpoints can tell which tokenizer made them."""
    enc = get_encoding()
    h = hashlib.sha256()
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + token)
    return {"name": ENCODING_NAME, "vocab_size": enc.n_vocab, "ranks_sha256": h.hexdigest()}
