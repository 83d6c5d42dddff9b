"""The options that shape a preparation's output, and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from ds_trainer.errors import DsTrainerError, join_problems

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_UNIT_BYTES = 256 * 1024
NORMALIZE_FORMS = ("NFC", "NFKC", "none")
INVALID_UTF8_POLICIES = ("error", "replace", "skip")


@dataclass
class PrepareOptions:
    """Everything that shapes the output (the worker count does not). See launch/prepare_data.py --help."""

    val_fraction: float = 0.005
    seed: int = 1234
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    text_field: str = "text"
    min_chars: int = 0
    normalize: str = "NFC"
    remove_control: bool = True
    decontaminate: tuple[str, ...] = ()
    ngram: int = 13
    invalid_utf8: str = "error"
    skip_bad_records: bool = False
    unit_bytes: int = DEFAULT_UNIT_BYTES

    def validate(self) -> None:
        problems = []
        if not 0.0 <= self.val_fraction <= 1.0:
            problems.append(f"--val_fraction {self.val_fraction}: must be between 0 and 1")
        if self.shard_tokens < 1:
            problems.append(f"--shard_tokens {self.shard_tokens}: must be at least 1")
        if self.min_chars < 0:
            problems.append(f"--min_chars {self.min_chars}: must be 0 or more")
        if self.ngram < 1:
            problems.append(f"--ngram {self.ngram}: must be at least 1")
        if self.unit_bytes < 1024:
            problems.append(f"--unit_bytes {self.unit_bytes}: must be at least 1024")
        forms = {f.lower(): f for f in NORMALIZE_FORMS}
        if str(self.normalize).lower() not in forms:
            problems.append(f"--normalize {self.normalize}: expected one of {', '.join(NORMALIZE_FORMS)}")
        else:
            self.normalize = forms[str(self.normalize).lower()]
        if self.invalid_utf8 not in INVALID_UTF8_POLICIES:
            problems.append(
                f"--invalid_utf8 {self.invalid_utf8}: expected one of {', '.join(INVALID_UTF8_POLICIES)}"
            )
        if not self.text_field:
            problems.append("--text_field: must not be empty")
        if problems:
            raise DsTrainerError(join_problems(problems))
        self.decontaminate = tuple(str(p) for p in self.decontaminate)
