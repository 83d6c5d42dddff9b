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

import psutil
import torch
import torch.distributed

REQUEUE_EXIT = 85  # "preempted, checkpoint saved, requeue me": launch/slurm/pretrain.sbatch requeues on it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, time_limit_s: float | None, grace_s: float, world_size: int) -> None:
        self.time_limit_s = time_limit_s
        self.grace_s = grace_s
        self.world = world_size
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

    def agreed(self, device: torch.device, save_seconds: float) -> str | None:
        """Collective: why every rank stops now (the first reason any rank has), or None to go on."""
        # One integer carries the reason: 100 + a signal's number outranks the time limit (1).
        local = 0
        if self.received is not None:
            local = 100 + self.received
        elif self._out_of_time(save_seconds):
            local = 1
        if self.world > 1:
            t = torch.tensor([local], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            local = int(t.item())
        if local >= 100:
            return f"received {signal.Signals(local - 100).name}"
        if local == 1:
            return f"the time limit of {self.time_limit_s:.0f} s is near"
        return None
