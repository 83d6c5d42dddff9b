"""launch/resilient.py's own options (those before the deepspeed arguments) and the wait between attempts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from ds_trainer.errors import DsTrainerError

# `launch/resilient.py --help`: what the supervisor does, its exit codes and its records.
# The design behind it: docs/resilience.md.
DESCRIPTION = """\
Restart a DeepSpeed run without a person: relaunch after a failure, probe hosts, exclude the bad ones.

    python launch/resilient.py [--max_restarts 3] [--backoff 10] ... [--] DEEPSPEED_ARGS...

Everything after resilient's own options is what `deepspeed` would get (`--hostfile`, `--master_addr`,
the script and its arguments). Each attempt runs that launcher; its exit code decides what follows:

    0            the run finished: stop with 0
    85           preempted, a checkpoint is saved (REQUEUE_EXIT): stop with 85, the scheduler requeues
    2            a user error (bad config): retrying cannot help, stop with 2
    anything     a failure: remove what is left of the attempt, wait (doubling back-off), probe the
    else         hosts, exclude those that fail, relaunch; the trainer resumes by itself from the newest
                 verified checkpoint in --checkpoint.dir, on fewer ranks too (same global batch).

The run folder (`--checkpoint.dir`, or the --config YAML's) holds the record: `restarts.jsonl` (one
JSON line per event: launch, exit, cleanup, probe, exclusion, wait, stop) and `excluded_hosts` (one
line per host with the time and the probe's reason; delete a line to let that host back in).
"""


@dataclass(frozen=True)
class Options:
    max_restarts: int = 3
    """Relaunches after failures before giving up (for this supervisor's lifetime)."""
    backoff: float = 10.0
    """Seconds before the first relaunch; doubled for each further one."""
    backoff_max: float = 300.0
    """Cap on the wait between relaunches."""
    probe_timeout: float = 30.0
    """Seconds a host gets to answer the probe (ssh connect, torch import, tensor op)."""
    probe_device: str = "auto"
    """Where the probe's tensor op runs: auto (CUDA when the host has it), cpu or cuda."""


def _own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/resilient.py",
        usage="%(prog)s [OPTIONS] [--] DEEPSPEED_ARGS... SCRIPT [SCRIPT_ARGS...]",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an abbreviation could swallow a deepspeed option
    )
    d = Options()
    p.add_argument(
        "--max_restarts", type=int, default=d.max_restarts, help="relaunches after failures before giving up"
    )
    p.add_argument("--backoff", type=float, default=d.backoff, help="seconds before the first relaunch")
    p.add_argument("--backoff_max", type=float, default=d.backoff_max, help="cap on the doubling wait")
    p.add_argument("--probe_timeout", type=float, default=d.probe_timeout, help="seconds per host probe")
    p.add_argument("--probe_device", choices=("auto", "cpu", "cuda"), default=d.probe_device)
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """resilient's options come first; the first token that is not one of them (or a `--`) starts the
    deepspeed arguments. Returns (own, deepspeed)."""
    flags = {"--max_restarts", "--backoff", "--backoff_max", "--probe_timeout", "--probe_device"}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return list(argv[:i]), list(argv[i + 1 :])
        if tok in ("-h", "--help"):
            i += 1
        elif tok.split("=", 1)[0] in flags:
            i += 1 if "=" in tok else 2
        else:
            break
    return list(argv[:i]), list(argv[i:])


def parse_options(own: Sequence[str]) -> Options:
    a = _own_parser().parse_args(list(own))
    problems = []
    if a.max_restarts < 0:
        problems.append("--max_restarts must be 0 or more")
    if a.backoff < 0 or a.backoff_max < 0:
        problems.append("--backoff and --backoff_max must be 0 or more")
    if a.probe_timeout <= 0:
        problems.append("--probe_timeout must be positive")
    if problems:
        raise DsTrainerError("; ".join(problems))
    return Options(a.max_restarts, a.backoff, a.backoff_max, a.probe_timeout, a.probe_device)


def backoff_delay(restart: int, base: float, cap: float) -> float:
    """Seconds to wait before relaunch number `restart` (1, 2, ...): base, 2 base, 4 base, ..., capped."""
    return min(base * 2 ** (restart - 1), cap)
