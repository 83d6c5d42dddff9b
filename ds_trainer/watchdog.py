"""Hang detection: a rank that makes no progress for `timeout_s` writes every thread's Python stack to
stderr (the job's log) and exits with EXIT_HANG, so the launcher takes the job down and a restart can
follow.

Collective timeouts alone are not enough: DeepSpeed's data-parallel group was seen to stay blocked for
minutes past a short timeout. The check runs in a thread of its own, which gets the GIL while the main
thread waits in a collective; faulthandler's C-level timer backs it up for a main thread that never
lets go of the GIL.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

import psutil

EXIT_HANG = 86
BACKSTOP_S = 60.0


class Watchdog:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Progress: restart the countdown."""
        if self.timeout_s <= 0:
            return
        self._last = time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ds_trainer-watchdog", daemon=True)
            self._thread.start()
        faulthandler.dump_traceback_later(
            self.timeout_s + BACKSTOP_S, repeat=False, file=sys.stderr, exit=True
        )

    def stop(self) -> None:
        self._done.set()
        if self.timeout_s > 0:
            faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                rank = os.environ.get("RANK", "0")
                print(
                    f"watchdog: rank {rank} made no progress for {idle:.0f} s (timeout {self.timeout_s:g} s); stacks:",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                _kill_stopped_siblings()
                os._exit(EXIT_HANG)


def _kill_stopped_siblings() -> None:
    """A stopped rank ignores the launcher's SIGTERM and holds the job for the launcher's 30 s grace;
    a peer on this host that is stopped (SIGSTOP, a debugger) is beyond saving, so end it now."""
    try:
        parent = psutil.Process().parent()
        siblings = parent.children() if parent is not None else []
    except psutil.Error:
        return
    for p in siblings:
        try:
            if p.pid != os.getpid() and p.status() == psutil.STATUS_STOPPED:
                print(f"watchdog: killing stopped peer process {p.pid}", file=sys.stderr, flush=True)
                p.kill()
        except psutil.Error:
            continue
