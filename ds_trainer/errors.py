"""The one exception type for problems a user can fix (bad config, bad input), and how a rank reports it."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# How long a rank other than 0 waits for rank 0 to report the same problem and for the launcher to stop
# it. Ranks reach their checks within about a second of each other; the deepspeed launcher polls every
# second and stops every rank once one exits non-zero.
PEER_REPORT_GRACE_S = 30.0


class DsTrainerError(Exception):
    """A problem in the user's input. `launch/` prints it as one line and exits with code 2."""

    exit_code = 2


# How several problems read as the one line a user sees.
PROBLEM_SEPARATOR = "; "


class ConfigError(DsTrainerError):
    """One or more problems in the run config (or a file it names), all listed in one message."""


def join_problems(problems: Iterable[str]) -> str:
    return PROBLEM_SEPARATOR.join(problems)


class Problems:
    """Every problem found in a set of inputs, so that one error names them all (not just the first)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, problem: str | None) -> None:
        if problem:
            self.items.append(problem)

    def extend(self, problems: Iterable[str]) -> None:
        for problem in problems:
            self.add(problem)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Record a DsTrainerError raised inside the block as one more problem and go on."""
        try:
            yield
        except DsTrainerError as e:
            self.items.append(str(e))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, error_type: type[DsTrainerError] = DsTrainerError) -> None:
        if self.items:
            raise error_type(join_problems(self.items))


def report_on_rank(error: DsTrainerError, rank: int, grace_s: float = PEER_REPORT_GRACE_S) -> int:
    """Print `error` as one `error:` line, once per job; returns its exit code.

    Every rank finds the same problem, and rank 0 says it. Another rank must not exit first: a launcher
    that sees it exit stops every rank, rank 0 too, sometimes before rank 0 has printed (CI saw a bad
    JSON give exit code 2 and no error line at all). So the other ranks wait to be stopped; one still
    alive after `grace_s` has a problem rank 0 did not have, and prints it with its rank.
    """
    if rank != 0:
        # The launcher's stop must end the wait at once, whatever handler the run installed.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(grace_s)
    print(f"error: {'' if rank == 0 else f'rank {rank}: '}{error}", file=sys.stderr, flush=True)
    return error.exit_code
