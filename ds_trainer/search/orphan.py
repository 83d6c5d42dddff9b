"""`python -m ds_trainer.search.orphan PARENT_PID COMMAND...`: run COMMAND so that it gets SIGTERM when the
search thread that started it dies (a SIGKILLed search included), then exec it.

SIGTERM makes a ds_trainer run save a checkpoint and exit 85, and makes the deepspeed launcher pass it on
to its ranks, so a killed search leaves checkpoints to resume from instead of runs nobody follows.
Linux's PR_SET_PDEATHSIG survives the exec; subprocess's preexec_fn is not safe with threads, hence this
small step between the search and the run.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, command = int(sys.argv[1]), sys.argv[2:]
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the search died before the prctl: nobody would follow this run
        sys.exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
