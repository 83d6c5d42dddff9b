"""The search space: run-config keys and the values to try, read from YAML and checked before any trial.

    train.peak_lr: [1.0e-4, 5.0e-4, 1.0e-3]        # a list: these values (the book's grid)
    train.weight_decay: {low: 0.0, high: 0.1}      # a range: for the random and TPE samplers
    train.min_lr: {low: 1.0e-5, high: 1.0e-3, log: true}

Every key is a run-config key (`section.key`, as on the command line) and every value is checked by the
run config's own loader, so a value a trial would refuse is refused here, with the others, at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ds_trainer.config import load_run_config, read_yaml
from ds_trainer.errors import DsTrainerError, Problems

RANGE_KEYS = {"low", "high", "log"}


@dataclass(frozen=True)
class Range:
    """A continuous (or integer, when both ends are integers) interval for the random and TPE samplers."""

    low: float
    high: float
    log: bool = False

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


@dataclass(frozen=True)
class SearchSpace:
    """Run-config key → the values to try (a list) or a Range. Built by `load_space`, never changed."""

    source: str
    params: dict[str, list[Any] | Range]

    @property
    def grid_size(self) -> int | None:
        """The number of combinations of the lists; None when a key is a range (no finite grid)."""
        if any(isinstance(v, Range) for v in self.params.values()):
            return None
        return math.prod(len(v) for v in self.params.values())

    def grid(self) -> dict[str, list[Any]]:
        """The lists, for the grid (every key a list: `check_sampler` says so first)."""
        return {k: list(v) for k, v in self.params.items() if isinstance(v, list)}

    def fingerprint(self) -> str:
        """The space as canonical JSON: a study folder remembers it, and refuses another space."""
        plain = {k: v if isinstance(v, list) else vars(v) for k, v in sorted(self.params.items())}
        return json.dumps(plain, sort_keys=True)

    def describe(self) -> str:
        """One line: each key with its number of values or its range."""
        parts = []
        for key, values in self.params.items():
            if isinstance(values, Range):
                parts.append(f"{key} in [{values.low}, {values.high}]{' log' if values.log else ''}")
            else:
                parts.append(f"{key} x {len(values)}")
        return ", ".join(parts)

    def check_sampler(self, sampler: str) -> None:
        ranges = [k for k, v in self.params.items() if isinstance(v, Range)]
        if sampler == "grid" and ranges:
            raise DsTrainerError(
                f"{self.source}: the grid sampler needs a list of values for every key, but "
                f"{', '.join(ranges)} {'is a range' if len(ranges) == 1 else 'are ranges'}; "
                "give lists, or use --sampler random or tpe"
            )


def as_override(key: str, value: Any) -> list[str]:
    """`--section.key value` as the run config's command line reads it back to the same value."""
    return [f"--{key}", value if isinstance(value, str) else json.dumps(value)]


def _entry(key: str, value: Any, where: str, problems: Problems) -> list[Any] | Range | None:
    if isinstance(value, list):
        if not value:
            problems.add(f"{where}: empty list; give at least one value")
            return None
        if len({json.dumps(v, sort_keys=True) for v in value}) < len(value):
            problems.add(f"{where}: a value is listed twice in {value!r}; list each once")
        return value
    if isinstance(value, dict):
        unknown = set(value) - RANGE_KEYS
        if unknown or not {"low", "high"} <= set(value):
            problems.add(f"{where}: a range is {{low: L, high: H}} with optional `log: true`, got {value!r}")
            return None
        low, high, log = value["low"], value["high"], value.get("log", False)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
        if not numbers or not isinstance(log, bool):
            problems.add(f"{where}: low and high must be numbers and log true or false, got {value!r}")
            return None
        if low >= high:
            problems.add(f"{where}: low ({low}) must be below high ({high})")
        if log and low <= 0:
            problems.add(f"{where}: a log range needs low > 0, got {low}")
        return Range(low, high, log)
    problems.add(f"{where}: expected a list of values or a range {{low, high, log}}, got {value!r}")
    return None


def load_space(path: str, config: str | None, overrides: list[str]) -> SearchSpace:
    """Read and check SPACE.yaml against the run config the trials start from (`config` + `overrides`).

    Each value (each end of a range) is loaded into that run config as a trial would load it, so unknown
    keys, wrong types and values out of bounds are found now; every problem is reported at once.
    """
    raw = read_yaml(path, "search space", "--space")
    if not isinstance(raw, dict) or not raw:
        raise DsTrainerError(
            f"search space {path} must map run-config keys to values, e.g. `train.peak_lr: [1.0e-4, 5.0e-4]`"
        )
    problems = Problems()
    params: dict[str, list[Any] | Range] = {}
    for key, value in raw.items():
        where = f"{path}: {key}"
        if not isinstance(key, str) or key.count(".") != 1:
            problems.add(f"{where}: keys are run-config keys `section.key`, e.g. train.peak_lr")
            continue
        entry = _entry(key, value, where, problems)
        if entry is None:
            continue
        params[key] = entry
        tried = [entry.low, entry.high] if isinstance(entry, Range) else entry
        for v in tried:
            try:
                load_run_config(config, [*overrides, *as_override(key, v)])
            except DsTrainerError as e:
                problems.add(f"{where}: value {v!r}: {e}")
                break  # one value is enough to name the key's problem (an unknown key fails them all)
    problems.raise_if_any(DsTrainerError)
    return SearchSpace(source=path, params=params)
