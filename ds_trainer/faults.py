"""Fault injection for failure tests and drills: DS_TRAINER_FAULTS="kill@6:1,kill_in_save@8:1".

Each entry is KIND@STEP[:RANK] (no rank: every rank). A fault fires once per run folder, in the process
whose rank matches, when the run reaches that step: it is written to `<run>/faults_fired` before it
acts, so the same command started again (which may replay that step after resuming) runs past it.
  kill                 SIGKILL this rank after the step's update.
  stop                 SIGSTOP this rank after the step's update: a hang, for the watchdog to catch.
  kill_in_save         during the save at that step: truncate one of this rank's files to half, then
                       SIGKILL (before the barrier that precedes the commit).
  kill_after_manifest  SIGKILL rank 0 in the save's commit once `manifest.json` is written, before
                       `.partial-step_N/` is renamed to `step_N/`.
  kill_after_rename    SIGKILL rank 0 in the commit once `step_N/` is in place, before `latest` is
                       replaced.
  kill_in_latest       SIGKILL rank 0 while `latest` is replaced: its temporary file is written,
                       os.replace has not run.
  nan                  this rank's loss at that step becomes NaN (before backward, so its gradients are
                       NaN too).
  spike                this rank's loss at that step is multiplied by 10 (its gradients too).
The three commit kills name rank 0 or no rank: rank 0 alone commits a save.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ds_trainer.errors import DsTrainerError

if TYPE_CHECKING:
    from ds_trainer.step import StepResult

ENV = "DS_TRAINER_FAULTS"
COMMIT_KILLS = ("kill_after_manifest", "kill_after_rename", "kill_in_latest")  # in this order in a save
KINDS = ("kill", "stop", "kill_in_save", *COMMIT_KILLS, "nan", "spike")
LOSS_FACTORS = {"nan": float("nan"), "spike": 10.0}


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise DsTrainerError(
                f"{ENV}: cannot read {item!r}; write KIND@STEP[:RANK] with KIND one of {KINDS}"
            )
        if kind in COMMIT_KILLS and rank and int(rank) != 0:
            raise DsTrainerError(f"{ENV}: {item!r} would never fire: rank 0 alone commits a save")
        faults.append(Fault(kind, int(step), int(rank) if rank else None))
    return faults


LEDGER = "faults_fired"


class Faults:
    def __init__(self, faults: list[Fault], rank: int, run_dir: Path) -> None:
        self.kinds = frozenset(f.kind for f in faults)
        """Every kind planned, on any rank: the same on all ranks, so a refusal is too."""
        self.mine = [f for f in faults if f.rank in (None, rank)]
        self.rank = rank
        self.ledger = run_dir / LEDGER

    @classmethod
    def from_env(cls, rank: int, run_dir: Path) -> Faults:
        return cls(parse(os.environ.get(ENV, "")), rank, run_dir)

    def pipeline_problem(self) -> str | None:
        """Loss faults act between the forward pass and the update, which the pipeline engine runs as one call."""
        refused = sorted(self.kinds & LOSS_FACTORS.keys())
        if not refused:
            return None
        return (
            f"{ENV}: {', '.join(refused)} cannot be injected with pipeline stages (the pipeline engine updates "
            "inside one call); drill them with pipeline.stages 1"
        )

    def due(self, kind: str, step: int) -> bool:
        """True once for a fault of `kind` at `step`; recorded durably before the caller acts on it."""
        if not any(f.kind == kind and f.step == step for f in self.mine):
            return False
        entry = f"{kind}@{step}:{self.rank}"
        if self.ledger.is_file() and entry in self.ledger.read_text().split():
            return False
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        with open(self.ledger, "a") as f:
            f.write(entry + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def loss_factor(self, step: int) -> float:
        """What this rank multiplies its loss by at `step` (1.0: nothing injected)."""
        for kind, factor in LOSS_FACTORS.items():
            if self.due(kind, step):
                return factor
        return 1.0

    def after_step(self, result: StepResult) -> None:
        if self.due("kill", result.step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.due("stop", result.step):
            os.kill(os.getpid(), signal.SIGSTOP)

    def in_save(self, step: int, folder: Path, rank: int) -> None:
        """Called once this rank's files of the save are written, before the save is committed."""
        if not self.due("kill_in_save", step):
            return
        shards = sorted(p for p in folder.iterdir() if p.is_file() and f"rank_{rank}_" in p.name)
        victim = shards[0] if shards else folder / f"rng_rank{rank:05d}.pt"
        size = victim.stat().st_size
        with open(victim, "r+b") as f:
            f.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def in_commit(self, kind: str, step: int) -> None:
        """Called by rank 0 at each point of the commit named in COMMIT_KILLS."""
        assert kind in COMMIT_KILLS, kind
        if self.due(kind, step):
            os.kill(os.getpid(), signal.SIGKILL)
