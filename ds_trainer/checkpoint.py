"""Saving and resuming: DeepSpeed's model/optimizer/scheduler files plus everything else a restart needs."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ds_trainer.errors import DsTrainerError

CLIENT_KEY = "ds_trainer"
LATEST = "latest"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """How far the run has come; the data position lives in the sampler."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])


class RNGState:
    """This rank's random generators. DeepSpeed saves none, and dropout draws differ per rank."""

    def state_dict(self) -> dict:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


class Checkpointer:
    """Writes a checkpoint as one DeepSpeed tag folder holding, beside DeepSpeed's files:
    the resolved run and DeepSpeed configs (rank 0) and each rank's RNG state.
    `shared` objects are identical on all ranks and travel in DeepSpeed's client state.
    """

    def __init__(
        self, directory: Path, rank: int, shared: dict[str, Stateful], configs: dict[str, Any]
    ) -> None:
        self.dir = directory
        self.rank = rank
        self.shared = shared
        self.rng = RNGState()
        self.configs = configs

    def latest_tag(self) -> str | None:
        f = self.dir / LATEST
        return f.read_text().strip() if f.is_file() else None

    def save(self, engine: Any, step: int) -> Path:
        tag = tag_for_step(step)
        folder = self.dir / tag
        folder.mkdir(parents=True, exist_ok=True)
        # Written before DeepSpeed's save, which updates `latest` last: a checkpoint that `latest`
        # names always has these files.
        torch.save(self.rng.state_dict(), folder / f"rng_rank{self.rank:05d}.pt")
        if self.rank == 0:
            for name, cfg in self.configs.items():
                (folder / f"{name}.json").write_text(json.dumps(cfg, indent=2, default=str))
        client = {CLIENT_KEY: {k: o.state_dict() for k, o in self.shared.items()}}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client)
        return folder

    def resume(self, engine: Any) -> str | None:
        """Load the latest checkpoint if there is one; returns its tag."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise DsTrainerError(
                f"{self.dir / LATEST} names {tag}, which DeepSpeed could not load; point `latest` at an earlier "
                "checkpoint folder, or set checkpoint.resume false to start afresh"
            )
        for k, o in self.shared.items():
            o.load_state_dict(client[CLIENT_KEY][k])
        rng_file = self.dir / tag / f"rng_rank{self.rank:05d}.pt"
        if rng_file.is_file():
            self.rng.load_state_dict(torch.load(rng_file, weights_only=False))
        return tag
