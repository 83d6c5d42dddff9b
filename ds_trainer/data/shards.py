"""Reading prepared token shards (written by ds_trainer.data.prepare) as one memory-mapped token array."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ds_trainer.errors import DsTrainerError

FORMAT = "ds_trainer.tokens.v1"
PROGRESS_FILE = "progress.json"  # written first by a preparation and kept after it


def is_prepared(path: str | Path) -> bool:
    """A folder launch/prepare_data.py wrote: train.json once its shards are complete, progress.json from
    the start. An unfinished one counts too, so that read_metadata names it instead of it being read as text.
    """
    p = Path(path)
    return (p / "train.json").is_file() or (p / PROGRESS_FILE).is_file()


def read_metadata(folder: str | Path, split: str) -> dict:
    """The split's metadata (see ds_trainer.data.prepare); a missing or damaged file is a one-line error."""
    f = Path(folder) / f"{split}.json"
    if not f.is_file():
        raise DsTrainerError(
            f"{folder}: the preparation in this folder did not finish (no {split}.json); "
            "rerun the same launch/prepare_data.py command to complete it"
        )
    rewrite = "rerun the same launch/prepare_data.py command to rewrite it, or prepare the data again"
    try:
        meta = json.loads(f.read_text())
    except OSError as e:
        raise DsTrainerError(
            f"{f}: cannot be read ({e.strerror or e}); make it readable, or {rewrite}"
        ) from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise DsTrainerError(f"{f}: damaged, not valid JSON ({e}); {rewrite}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise DsTrainerError(f"{f}: format {got!r} is not {FORMAT!r}; prepare the data again")
    return meta


class TokenShards:
    """The shards of one split as a single read-only token sequence; slicing may cross shard boundaries."""

    def __init__(self, folder: str | Path, split: str, expected_tokenizer: dict, vocab_size: int) -> None:
        self.folder = Path(folder)
        meta = read_metadata(folder, split)
        self.meta = meta
        got = meta["tokenizer"]
        if (
            got.get("ranks_sha256") != expected_tokenizer["ranks_sha256"]
            or got.get("name") != expected_tokenizer["name"]
        ):
            raise DsTrainerError(
                f"{self.folder}/{split}.json: shards were made with tokenizer {got.get('name')} "
                f"(ranks {str(got.get('ranks_sha256'))[:12]}…), this run uses {expected_tokenizer['name']} "
                f"(ranks {expected_tokenizer['ranks_sha256'][:12]}…); prepare the data again with this tokenizer"
            )
        if meta["tokens"] and meta["max_token_id"] >= vocab_size:
            raise DsTrainerError(
                f"{self.folder}/{split}.json: token id {meta['max_token_id']} is beyond the model's vocabulary of "
                f"{vocab_size}; raise model.vocab_size or prepare the data with the model's tokenizer"
            )
        self.arrays = []
        for shard in meta["shards"]:
            path = self.folder / shard["file"]
            size = path.stat().st_size if path.is_file() else -1
            if size != 2 * shard["tokens"]:
                raise DsTrainerError(
                    f"{path}: expected {shard['tokens']} tokens ({2 * shard['tokens']} bytes), found "
                    f"{'no file' if size < 0 else f'{size} bytes'}; prepare the data again"
                )
            self.arrays.append(np.memmap(path, dtype=np.uint16, mode="r"))
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop, _ = s.indices(len(self))
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - int(self.offsets[first])
            take = min(stop - start, len(self.arrays[first]) - lo)
            parts.append(self.arrays[first][lo : lo + take])
            start += take
            first += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
