"""Stopping on time: SIGTERM/SIGUSR1 and a wall-clock budget become one decision that all ranks take
at the same step boundary, followed by a checkpoint and the exit code that asks to be requeued.

The signal handler only records the signal: collectives and saving happen in the training loop, never
inside a handler. A second signal, or a save that overruns its grace period, forces the exit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import psutil

from ds_trainer.collectives import Group

if TYPE_CHECKING:
    from ds_trainer.checkpoint import Checkpointer
    from ds_trainer.metrics import Metrics
    from ds_trainer.step import StepResult

REQUEUE_EXIT = 85  # "preempted, checkpoint saved, requeue me": launch/slurm/pretrain.sbatch requeues on it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The decision: a signal received on any rank, or the time limit near."""

    def __init__(self, time_limit_s: float | None, grace_s: float, group: Group) -> None:
        self.time_limit_s = time_limit_s
        self.grace_s = grace_s
        self.group = group
        # Counted from the process start, as a scheduler's time limit is: imports and set-up included.
        self.start = psutil.Process().create_time()
        self.received: int | None = None
        self._slowest_step = 0.0

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # asked twice: do not wait for the save
        self.received = signum
        # If the save hangs or outlasts the grace period, leave anyway: the scheduler is about to kill us.
        timer = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()

    def note_step(self, seconds: float) -> None:
        self._slowest_step = max(self._slowest_step, seconds)

    def _out_of_time(self, save_seconds: float) -> bool:
        if self.time_limit_s is None:
            return False
        # Room for one more step and a save, with slack: stopping a step early costs little, late costs all.
        needed = 2 * self._slowest_step + 1.5 * save_seconds + 10.0
        return time.time() - self.start + needed >= self.time_limit_s

    def agreed(self, save_seconds: float) -> str | None:
        """Collective: why every rank stops now (the first reason any rank has), or None to go on."""
        # One integer carries the reason: 100 + a signal's number outranks the time limit (1).
        local = 0
        if self.received is not None:
            local = 100 + self.received
        elif self._out_of_time(save_seconds):
            local = 1
        local = self.group.max(local)
        if local >= 100:
            return f"received {signal.Signals(local - 100).name}"
        if local == 1:
            return f"the time limit of {self.time_limit_s:.0f} s is near"
        return None


class Stopper:
    """Acts on the decision at each step boundary: saves and asks to be requeued."""

    def __init__(
        self, request: StopRequest, checkpointer: Checkpointer, metrics: Metrics, total_steps: int
    ) -> None:
        self.request = request
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.total_steps = total_steps
        request.install()

    def after_step(self, result: StepResult) -> None:
        self.request.note_step(result.seconds)

    def check(self, step: int) -> int | None:
        """Collective: REQUEUE_EXIT once a stop is agreed before the last step (checkpoint saved), else None."""
        reason = self.request.agreed(self.checkpointer.last_save_seconds)
        if reason is None or step >= self.total_steps:
            return None
        self.checkpointer.save_now(step)
        self.metrics.print_line(f"stopping at step {step}: {reason}; checkpoint saved, exit {REQUEUE_EXIT}")
        return REQUEUE_EXIT
