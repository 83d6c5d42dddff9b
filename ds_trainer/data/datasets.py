"""From the run's data settings to train and validation window sets, whatever the source."""

from __future__ import annotations

from ds_trainer.data.shards import TokenShards, is_prepared, read_metadata
from ds_trainer.data.text import TokenWindows, WindowSet, text_tokens
from ds_trainer.errors import DsTrainerError
from ds_trainer.tokenizer import get_encoding, identity

DEFAULT_VAL_FRACTION = 0.1


def _windows(tokens, context_length: int, stride: int, what: str) -> TokenWindows:
    w = TokenWindows(tokens, context_length, stride)
    if len(w) == 0:
        raise DsTrainerError(
            f"{what} has {len(tokens)} tokens, fewer than one window of context_length+1 = {context_length + 1}; "
            "add text or lower --data.context_length"
        )
    return w


def build_datasets(
    sources: dict[str, float], context_length: int, stride: int, val_fraction: float | None, vocab_size: int
) -> tuple[WindowSet, WindowSet | None, list[float]]:
    """Train windows, validation windows (None when there are none to evaluate) and mixture weights.

    `sources` maps each path to its weight; a path is a prepared folder (see launch/prepare_data.py),
    a text file, folder or glob, or "" for the built-in corpus. Prepared folders bring their own
    validation split; text is split by `val_fraction` (default 0.1).
    """
    prepared = {path: bool(path) and is_prepared(path) for path in sources}
    if val_fraction is not None and all(prepared.values()):
        raise DsTrainerError(
            f"data.val_fraction={val_fraction} does not apply to prepared folders ({', '.join(sources)}): they hold "
            "the validation split made by launch/prepare_data.py --val_fraction; remove data.val_fraction"
        )
    val_fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    n_vocab = get_encoding().n_vocab
    if vocab_size < n_vocab:
        raise DsTrainerError(
            f"model.vocab_size {vocab_size} is smaller than the GPT-2 tokenizer's {n_vocab} tokens; "
            f"set it to >= {n_vocab}"
        )
    train, val, names = [], [], []
    for path, _ in sources.items():
        name = path or "the built-in corpus"
        names.append(name)
        if prepared[path]:
            train.append(
                _windows(
                    TokenShards(path, "train", identity(), vocab_size),
                    context_length,
                    stride,
                    f"{name} (train split)",
                )
            )
            if read_metadata(path, "val")["tokens"] > 0:
                val.append(
                    _windows(
                        TokenShards(path, "val", identity(), vocab_size),
                        context_length,
                        context_length,
                        f"{name} (val split)",
                    )
                )
            continue
        train_tokens, val_tokens = text_tokens(path, val_fraction)
        train.append(_windows(train_tokens, context_length, stride, f"data.path {name}"))
        if val_fraction > 0:
            if len(val_tokens) < context_length + 1:
                raise DsTrainerError(
                    f"{name}: the validation split (data.val_fraction={val_fraction}) has {len(val_tokens)} tokens, "
                    f"fewer than one window of {context_length + 1}; raise data.val_fraction, lower "
                    "data.context_length, or set data.val_fraction 0"
                )
            # Validation windows never overlap: each token is scored once.
            val.append(TokenWindows(val_tokens, context_length, context_length))
    weights = list(sources.values())
    val_set = WindowSet(val, names) if val else None
    return WindowSet(train, names), val_set, weights
