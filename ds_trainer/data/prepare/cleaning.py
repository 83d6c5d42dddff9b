"""One document's text: cleaning, its hash, and the split (train or val) that its hash puts it in."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

# C0 and C1 control characters except \t and \n (\r goes too: "\r\n" becomes "\n").
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str, normalize: str = "NFC", remove_control: bool = True) -> tuple[str, int, bool]:
    """(cleaned text, control characters removed, whether normalisation changed it).

    Control characters (C0/C1 except \\t and \\n) go first, then Unicode normalisation (NFC, NFKC or none).
    """
    removed = 0
    if remove_control and _CONTROL_RE.search(text):
        text, removed = _CONTROL_RE.subn("", text)
    changed = False
    if normalize != "none" and not unicodedata.is_normalized(normalize, text):
        text = unicodedata.normalize(normalize, text)
        changed = True
    return text, removed, changed


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _combine_digests(digests: Sequence[bytes]) -> bytes:
    """The hash of a document cut into pieces: blake2b over the pieces' hashes."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.blake2b(b"".join(digests), digest_size=16, person=b"ds_trainer.piece").digest()


def split_of(digest: bytes, seed: int, val_fraction: float) -> str:
    """'val' iff blake2b(seed, document hash) / 2**64 < val_fraction: fixed by the seed, order-independent."""
    h = hashlib.blake2b(int(seed).to_bytes(16, "little", signed=True) + digest, digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2.0**64 < val_fraction else "train"
