"""launch/resilient.py's entry point: read the arguments, set up the run folder and signals, supervise."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ds_trainer.errors import DsTrainerError
from ds_trainer.supervisor.launch import Launch, run_dir_of
from ds_trainer.supervisor.loop import Supervisor
from ds_trainer.supervisor.options import parse_options, split_argv
from ds_trainer.supervisor.records import RestartLog


def main(argv: Sequence[str]) -> int:
    """launch/resilient.py: parse, supervise, return the exit code."""
    own, ds_args = split_argv(argv)
    try:
        opts = parse_options(own)
        if not ds_args:
            raise DsTrainerError("nothing to launch; give the deepspeed arguments and the training script")
        launch = Launch.parse(ds_args)
        run_dir = run_dir_of(launch.script_args, Path.cwd())
    except DsTrainerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    run_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(opts, launch, run_dir, RestartLog(run_dir))
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, sup.on_signal)
    return sup.run()
