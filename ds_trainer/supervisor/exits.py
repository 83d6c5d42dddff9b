"""What an attempt's exit code means: finished, preempted (requeue), a user error, or a failure to retry."""

from __future__ import annotations

import enum

from ds_trainer.errors import DsTrainerError

# 85, "stopped early with a checkpoint saved, requeue me": defined once, where the trainer returns it.
from ds_trainer.preemption import REQUEUE_EXIT

USER_ERROR_EXIT = DsTrainerError.exit_code  # 2: the config or input is wrong; the same launch fails again
NO_HOST_EXIT = 1
"""Every host of the hostfile is excluded: nothing left to launch on."""


class Decision(enum.Enum):
    SUCCESS = "success"
    PREEMPTED = "preempted"
    USER_ERROR = "user_error"
    FAILURE = "failure"


def decide(exit_code: int) -> Decision:
    """What an attempt's exit code means. Only FAILURE is retried here: a preempted run is requeued by the
    scheduler (on other nodes, maybe), and a user error would fail the same way again."""
    if exit_code == 0:
        return Decision.SUCCESS
    if exit_code == REQUEUE_EXIT:
        return Decision.PREEMPTED
    if exit_code == USER_ERROR_EXIT:
        return Decision.USER_ERROR
    return Decision.FAILURE
