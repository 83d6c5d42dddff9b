"""A run's rank processes on this machine: the `pkill -f` pattern that names them (the one home of that
pattern: launch/slurm/pretrain.sbatch prints it from here), finding what an attempt left, killing it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path


def ere_escape(text: str) -> str:
    """`text` as a literal in a POSIX extended regex (pkill's) that Python's re reads the same way."""
    return re.sub(r"([][.*^$+?(){}|\\])", r"\\\1", text)


def rank_pattern(script: str, flag: str, value: str) -> str:
    """A `pkill -f` regex (grep -E and Python's re read it alike) for the rank processes of one run: the
    ranks, and only they, have `SCRIPT --local_rank=N` on their command line (the launcher processes do
    not), and this run's `FLAG VALUE` (or `FLAG=VALUE`) after it, e.g. `--checkpoint.dir RUN_DIR`.
    launch/slurm/pretrain.sbatch prints it (`$PYTHON -c ...`) for its own signal forwarding."""
    ident = f"{ere_escape(flag)}[ =]{ere_escape(value)}( |$)"
    return f"{ere_escape(os.path.basename(script))} --local_rank=[0-9]+ .*{ident}"


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _proc_pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def local_leftovers(pgid: int, pattern: str | None) -> list[int]:
    """Live processes of an ended attempt on this machine: its process group (the launcher is started as a
    group leader, so a local launch's ranks are in it) and ranks whose command line matches `pattern`."""
    rx = re.compile(pattern) if pattern else None
    found = []
    for pid in _pids():
        if not _alive(pid):
            continue
        if _proc_pgid(pid) == pgid or (rx is not None and rx.search(" ".join(_proc_cmdline(pid)))):
            found.append(pid)
    return found


def signal_matching(pattern: str, sig: signal.Signals) -> None:
    """`sig` to every live process on this machine whose command line matches `pattern` (pkill -f's way)."""
    rx = re.compile(pattern)
    for pid in _pids():
        if _alive(pid) and rx.search(" ".join(_proc_cmdline(pid))):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def kill_pids(pids: Sequence[int], wait: float = 10.0) -> list[int]:
    """SIGKILL these processes and wait for them to go; returns those still alive after `wait`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if _alive(p)]
    return left
