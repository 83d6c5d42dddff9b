"""Loss guard: non-finite losses and loss spikes are caught before the optimizer step.

Every step the ranks agree on the global mean loss (one all-reduce, in the step). A non-finite mean, or
one above `spike_factor` x the running mean of recent good steps, withholds the update: the step is
counted and its data consumed, but weights and optimizer state stay as they were. After
`rollback_after` consecutive withheld steps `ds_trainer.recovery` rolls back to the last good
checkpoint, skips the data since then, and the guard lowers the learning rate for a while (the
practice of large runs such as PaLM).
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ds_trainer.config import GuardSection


class LossGuard:
    """Judges each step's loss; its running statistics travel with every checkpoint."""

    def __init__(self, settings: GuardSection) -> None:
        self.settings = settings
        self.recent: deque[float] = deque(maxlen=settings.spike_window)
        self.consecutive = 0
        self.withheld = 0
        self.rollbacks = 0
        self.lr_cut_until = 0

    def judge(self, loss: float) -> str | None:
        """Why this step's update must be withheld, or None (the loss then joins the running mean)."""
        if not math.isfinite(loss):
            verdict = "non-finite loss"
        elif (
            self.settings.spike_factor > 0
            and len(self.recent) == self.recent.maxlen
            and loss > self.settings.spike_factor * (sum(self.recent) / len(self.recent))
        ):
            mean = sum(self.recent) / len(self.recent)
            verdict = f"loss spike ({loss:.3f} > {self.settings.spike_factor:g} x running mean {mean:.3f})"
        else:
            self.recent.append(loss)
            self.consecutive = 0
            return None
        self.consecutive += 1
        self.withheld += 1
        return verdict

    def wants_rollback(self) -> bool:
        return self.settings.rollback_after > 0 and self.consecutive >= self.settings.rollback_after

    def lr_scale(self, step: int) -> float:
        return self.settings.lr_factor if step <= self.lr_cut_until else 1.0

    def scale_lr(self, param_groups: list[dict], next_step: int) -> None:
        """After a rollback: the scheduler's rate (already set for `next_step`) times the guard's factor."""
        scale = self.lr_scale(next_step)
        if scale != 1.0:
            for group in param_groups:
                group["lr"] *= scale

    def rolled_back(self, counters: dict, resumed_step: int) -> None:
        """After a rollback to `resumed_step`: keep the counters of before it (`counters`, this guard's
        state_dict then) rather than the checkpoint's, count the rollback, and cut the rate from now."""
        self.load_state_dict({**counters, "consecutive": 0, "rollbacks": counters["rollbacks"] + 1})
        self.lr_cut_until = resumed_step + self.settings.lr_steps

    def state_dict(self) -> dict:
        return {
            "recent": list(self.recent),
            "consecutive": self.consecutive,
            "withheld": self.withheld,
            "rollbacks": self.rollbacks,
            "lr_cut_until": self.lr_cut_until,
        }

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(state["recent"], maxlen=self.settings.spike_window)
        self.consecutive = int(state["consecutive"])
        self.withheld = int(state["withheld"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_cut_until = int(state["lr_cut_until"])


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
