"""Loss guard: non-finite losses and loss spikes are caught before the optimizer step.

Every step the ranks agree on the global mean loss (one all-reduce). A non-finite mean, or one above
`spike_factor` × the running mean of recent good steps, withholds the update: the step is counted and
its data consumed, but weights and optimizer state stay as they were. After `rollback_after`
consecutive withheld steps the trainer rolls back to the last good checkpoint, skips the data since
then, and trains at a reduced learning rate for a while (the practice of large runs such as PaLM).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed


@dataclass(frozen=True)
class GuardSettings:
    spike_factor: float
    spike_window: int
    rollback_after: int
    lr_factor: float
    lr_steps: int


class LossGuard:
    """Judges each step's loss; its running statistics travel with every checkpoint."""

    def __init__(self, settings: GuardSettings, world_size: int) -> None:
        self.s = settings
        self.world = world_size
        self.recent: deque[float] = deque(maxlen=settings.spike_window)
        self.consecutive = 0
        self.withheld = 0
        self.rollbacks = 0
        self.lr_cut_until = 0

    def global_mean(self, local_mean: torch.Tensor) -> float:
        """Collective: the mean loss over ranks; NaN or inf on any rank makes it non-finite everywhere."""
        t = local_mean.detach().float().clone()
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return float(t) / self.world

    def judge(self, loss: float) -> str | None:
        """Why this step's update must be withheld, or None (the loss then joins the running mean)."""
        if not math.isfinite(loss):
            verdict = "non-finite loss"
        elif (
            self.s.spike_factor > 0
            and len(self.recent) == self.recent.maxlen
            and loss > self.s.spike_factor * (sum(self.recent) / len(self.recent))
        ):
            mean = sum(self.recent) / len(self.recent)
            verdict = f"loss spike ({loss:.3f} > {self.s.spike_factor:g} x running mean {mean:.3f})"
        else:
            self.recent.append(loss)
            self.consecutive = 0
            return None
        self.consecutive += 1
        self.withheld += 1
        return verdict

    def wants_rollback(self) -> bool:
        return self.s.rollback_after > 0 and self.consecutive >= self.s.rollback_after

    def lr_scale(self, step: int) -> float:
        return self.s.lr_factor if step <= self.lr_cut_until else 1.0

    def state_dict(self) -> dict:
        return {
            "recent": list(self.recent),
            "consecutive": self.consecutive,
            "withheld": self.withheld,
            "rollbacks": self.rollbacks,
            "lr_cut_until": self.lr_cut_until,
        }

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(state["recent"], maxlen=self.s.spike_window)
        self.consecutive = int(state["consecutive"])
        self.withheld = int(state["withheld"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_cut_until = int(state["lr_cut_until"])


def innermost_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrappers (which keep it as `.optimizer`)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


@contextmanager
def updates_withheld(engine: Any) -> Iterator[None]:
    """engine.step() runs its boundary bookkeeping (gradients cleared, counters and scheduler advanced)
    while the optimizer applies nothing: weights, moments and Adam's step count stay unchanged.
    Wrappers (ZeRO 1-3, bf16) copy their unchanged fp32 master weights back, which is a no-op too."""
    opt = innermost_optimizer(engine)
    opt.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del opt.step


class IncidentLog:
    """incidents.jsonl in the run folder, written by rank 0: one line per withheld step or rollback."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, **fields: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(fields, default=str) + "\n")
