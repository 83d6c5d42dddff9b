"""One trial as a real ds_trainer run: its own process (through the user's launcher), its own run folder,
its validation losses read from its metrics.jsonl as they are logged, and a stop that saves a checkpoint.

The search reports each validation loss to Optuna while the run goes on; when the pruner says stop, the
ranks get SIGUSR1, agree on a step, save and exit 85 (preemption.REQUEUE_EXIT), so a pruned trial could be
continued. A trial's process is tied to the search's: if the search dies, the trial gets SIGTERM (the same
save and exit), and the next search resumes it from that checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ds_trainer.preemption import REQUEUE_EXIT
from ds_trainer.process import free_port
from ds_trainer.supervisor.ranks import kill_pids, local_leftovers, rank_pattern, signal_matching

PRETRAIN = str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py")
LOG_FILE = "train.log"  # the trial's stdout and stderr, appended to by each start
METRICS_FILE = "metrics.jsonl"
VAL_LOSS, EVAL_TRAIN_LOSS, TRAIN_LOSS = "val/loss", "eval/train_loss", "train/loss"
POLL_S = 0.5
# How many times a run that exits 85 on its own (its time limit, a signal not from us) is started again
# before the trial counts as failed.
MAX_REQUEUES = 20


@dataclass
class TrialOutcome:
    """What a trial's run left: its losses as logged, and how it ended."""

    val_losses: dict[int, float] = field(default_factory=dict)
    train_loss: float | None = None
    steps: int = 0
    exit_code: int | None = None
    stopped: bool = False  # we asked it to stop (pruned, or the search is stopping)
    error: str | None = None


@dataclass(frozen=True)
class Slot:
    """Where a trial runs among the search's parallel ones: its devices and, for a launcher, its port."""

    index: int
    env: dict[str, str]


def slots(parallel: int, gpus: int, cores: int) -> list[Slot]:
    """Split the machine among `parallel` trials: GPUs evenly (CUDA_VISIBLE_DEVICES), or on a CPU the
    cores (OMP_NUM_THREADS), one rank each."""
    out = []
    for i in range(parallel):
        if gpus:
            share = gpus // parallel
            ids = range(i * share, (i + 1) * share)
            out.append(Slot(i, {"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}))
        else:
            out.append(Slot(i, {"OMP_NUM_THREADS": str(max(1, cores // parallel))}))
    return out


def launcher_command(launcher: str) -> list[str]:
    """The launcher's words, with a free rendezvous port for the deepspeed launcher and torchrun: two
    trials at once on one machine must not both take the default 29500."""
    words = shlex.split(launcher)
    if not words:
        return [sys.executable, "-u"]
    name = os.path.basename(words[0])
    if name in ("deepspeed", "torchrun") and not any(w.startswith("--master_port") for w in words):
        words += [f"--master_port={free_port()}"]
    return words


class TrialRun:
    """Start (or resume) one trial's run and follow it to its end."""

    def __init__(self, run_dir: Path, launcher: str, script_args: list[str], slot: Slot) -> None:
        self.run_dir = run_dir
        self.launcher = launcher
        self.args = [*script_args, "--checkpoint.dir", str(run_dir)]
        self.slot = slot
        self.proc: subprocess.Popen | None = None
        self.outcome = TrialOutcome()
        self._offset = 0  # bytes of metrics.jsonl read so far
        self._partial = b""
        self._eval_train_loss: float | None = None
        self._train_loss: float | None = None

    @property
    def command(self) -> list[str]:
        return [*launcher_command(self.launcher), PRETRAIN, *self.args]

    def start(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.slot.env}
        with (self.run_dir / LOG_FILE).open("ab") as log:
            # ds_trainer.search.orphan ties the run to this thread (SIGTERM when it dies), then execs.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ds_trainer.search.orphan", str(os.getpid()), *self.command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return self.proc.pid

    def follow(self, on_val_loss: Callable[[int, float], bool], stopping: Callable[[], bool]) -> TrialOutcome:
        """Until the run ends: read its new records, report each validation loss (`on_val_loss` returns
        True to stop the trial), and stop it when the search is stopping. Runs that exit 85 on their own
        are started again (they resume)."""
        requeues = 0
        while True:
            assert self.proc is not None
            code = self.proc.poll()
            self._read_records(on_val_loss)
            if code is None:
                if not self.outcome.stopped and stopping():
                    self.stop()
                time.sleep(POLL_S)
                continue
            self._read_records(on_val_loss)
            self._end_leftovers()
            self.outcome.exit_code = code
            if code == REQUEUE_EXIT and not self.outcome.stopped and requeues < MAX_REQUEUES:
                requeues += 1
                self.start()
                continue
            if code not in (0, REQUEUE_EXIT):
                self.outcome.error = last_error_line(self.run_dir / LOG_FILE) or f"exited with code {code}"
            return self.outcome

    def stop(self) -> None:
        """Ask the ranks to save and exit 85: SIGUSR1, which they agree on at the next step boundary."""
        self.outcome.stopped = True
        assert self.proc is not None
        if self.launcher.strip():
            signal_matching(rank_pattern(PRETRAIN, "--checkpoint.dir", str(self.run_dir)), signal.SIGUSR1)
        else:
            with contextlib.suppress(ProcessLookupError):  # it may have ended on its own just now
                os.kill(self.proc.pid, signal.SIGUSR1)  # a plain process is the one rank

    def _end_leftovers(self) -> None:
        """A launcher that exits before its ranks (killed, crashed) must not leave them writing into the
        run folder that the next start uses."""
        assert self.proc is not None
        pattern = rank_pattern(PRETRAIN, "--checkpoint.dir", str(self.run_dir))
        kill_pids(local_leftovers(self.proc.pid, pattern))

    def _read_records(self, on_val_loss: Callable[[int, float], bool]) -> None:
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            return
        with path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # a record still being written
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line a killed run cut short
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            step = record["step"]
            self.outcome.steps = max(self.outcome.steps, step)
            # The training loss in eval mode where the run evaluates it (as the books report), else the
            # logged one: the latest of whichever kind the run has.
            if EVAL_TRAIN_LOSS in record:
                self._eval_train_loss = float(record[EVAL_TRAIN_LOSS])
            if TRAIN_LOSS in record:
                self._train_loss = float(record[TRAIN_LOSS])
            self.outcome.train_loss = (
                self._eval_train_loss if self._eval_train_loss is not None else self._train_loss
            )
            if VAL_LOSS in record:
                value = float(record[VAL_LOSS])
                self.outcome.val_losses[step] = value
                if on_val_loss(step, value) and not self.outcome.stopped:
                    self.stop()


def last_error_line(log: Path) -> str | None:
    """The run's own one-line report (`error: ...`), else the last line of its log."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    return lines[-1][:500] if lines else None


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process (a previous search's trial, saving after its SIGTERM) to end; True if it did."""
    try:
        _, alive = psutil.wait_procs([psutil.Process(pid)], timeout=timeout)
    except psutil.NoSuchProcess:
        return True
    return not alive
