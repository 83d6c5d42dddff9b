"""The one exception type for problems a user can fix (bad config, bad input), and how a rank reports it."""

from __future__ import annotations

import signal
import sys
import time

# How long a rank other than 0 waits for rank 0 to report the same problem and for the launcher to stop
# it. Ranks reach their checks within about a second of each other; the deepspeed launcher polls every
# second and stops every rank once one exits non-zero.
PEER_REPORT_GRACE_S = 30.0


class DsTrainerError(Exception):
    """A problem in the user's input. `launch/` prints it as one line and exits with code 2."""

    exit_code = 2


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
