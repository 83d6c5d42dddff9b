"""What a checkpoint means: the run identity (changes refused on resume) and the configs saved beside it.

Every checkpoint folder holds `run_config.json`, `ds_config.json` and `meta.json`; `meta.json` carries
the layout (ZeRO stage, data-parallel size, pipeline stages) and the identity. On resume the current
run's configs are compared with the saved ones: an identity change is refused, any other run-config
change is reported as accepted.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds_trainer import __version__
from ds_trainer.tokenizer import identity as tokenizer_identity

if TYPE_CHECKING:
    from ds_trainer.config import RunConfig
    from ds_trainer.ds_config import ResolvedDSConfig
    from ds_trainer.model import GPTConfig

# The model's shape: the weights' tensors depend on every one of these.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "qkv_bias", "tie_embeddings")


@dataclass(frozen=True)
class RunIdentity:
    """The facts a checkpoint's meaning depends on; resume refuses a change to any of them."""

    model: dict[str, Any]
    """The model's shape (MODEL_FIELDS of its GPTConfig)."""
    tokenizer: dict[str, Any]
    """The tokenizer's name and a hash of its ranks."""
    context_length: int
    """Tokens per training window."""
    stride: int
    """Tokens between window starts."""
    data_sources: dict[str, float]
    """Every dataset with its weight."""
    val_fraction: float | None
    """The train/validation split of a text corpus."""
    seed: int
    """The seed the sample order is drawn from."""
    pipeline_stages: int
    """Pipeline stages: the checkpoint's files are per stage."""

    # Why each data field may not change, and the run-config keys every field comes from.
    WHY = {
        "context_length": "the training windows",
        "stride": "the training windows",
        "data_sources": "the datasets the data position counts in",
        "val_fraction": "the train/validation split",
        "seed": "the sample order the data position counts in",
    }
    CONFIG_KEYS = (
        "model",
        "data.path",
        "data.mixture",
        "data.context_length",
        "data.stride",
        "data.val_fraction",
        "train.seed",
        "pipeline.stages",
    )

    @classmethod
    def of(cls, run: RunConfig, gpt_config: GPTConfig, pipeline_stages: int) -> RunIdentity:
        return cls(
            model={k: getattr(gpt_config, k) for k in MODEL_FIELDS},
            tokenizer=tokenizer_identity(),
            context_length=run.context_length,
            stride=run.stride,
            data_sources=run.data_sources(),
            val_fraction=run.data.val_fraction,
            seed=run.train.seed,
            pipeline_stages=pipeline_stages,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def refused_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Identity changes between two saved identities (as in meta.json), as sentences."""
    refused = []
    for k in MODEL_FIELDS:
        if saved["model"].get(k) != current["model"].get(k):
            was, now = saved["model"].get(k), current["model"].get(k)
            refused.append(f"model.{k} {was} → {now} (the weights' shape)")
    if saved["tokenizer"] != current["tokenizer"]:
        refused.append(
            f"tokenizer {saved['tokenizer']} → {current['tokenizer']} (token ids would change meaning)"
        )
    for k, why in RunIdentity.WHY.items():
        if saved[k] != current[k]:
            refused.append(f"{k} {saved[k]} → {current[k]} ({why})")
    if saved["pipeline_stages"] != current["pipeline_stages"]:
        refused.append(
            f"pipeline.stages {saved['pipeline_stages']} → {current['pipeline_stages']} "
            "(resume on the same number of stages, or export the weights)"
        )
    return refused


def compare(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, accepted) differences between a checkpoint's configs and the current run's."""
    refused = refused_changes(saved["meta"]["identity"], current["meta"]["identity"])
    flat_s, flat_c = _flatten(saved["run_config"]), _flatten(current["run_config"])
    accepted = []
    for k in sorted(set(flat_s) | set(flat_c)):
        if any(k == i or k.startswith(i + ".") for i in RunIdentity.CONFIG_KEYS):
            continue  # judged as identity above
        if flat_s.get(k) != flat_c.get(k):
            accepted.append(f"{k} {flat_s.get(k)!r} → {flat_c.get(k)!r}")
    return refused, accepted


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "mixture":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_configs(run: RunConfig, ds: ResolvedDSConfig, gpt_config: GPTConfig, world: int) -> dict[str, Any]:
    """Saved beside every checkpoint: what resume compares and what a person reads to know the run."""
    return {
        "run_config": run.to_dict(),
        "ds_config": {k: v for k, v in ds.config.items() if k != "checkpoint"},
        "meta": {
            "ds_trainer": __version__,
            "git_commit": git_commit(),
            "versions": package_versions(),
            "world_size": world,
            "layout": layout_of(ds, world),
            "identity": RunIdentity.of(run, gpt_config, ds.pipeline_stages).to_dict(),
        },
    }


def layout_of(ds: ResolvedDSConfig, world: int) -> dict[str, int]:
    """How the run's state is cut into files: a change needs DeepSpeed's universal conversion."""
    return {
        "zero_stage": ds.zero_stage,
        "data_parallel": world // ds.pipeline_stages,
        "pipeline_stages": ds.pipeline_stages,
    }


@functools.cache  # asked once per process: every save writes it, and resume compares before the engine exists
def git_commit() -> str | None:
    """The project's commit when it runs from a git checkout; None for an installed copy."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def package_versions() -> dict[str, str]:
    import deepspeed
    import numpy as np
    import tiktoken
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "tiktoken": tiktoken.__version__,
        "numpy": np.__version__,
    }
