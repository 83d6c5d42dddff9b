"""Restart a DeepSpeed run without a person: relaunch after a failure, probe hosts, exclude the bad ones.

`python launch/resilient.py --help` says how to use it (options.DESCRIPTION). One module per job (options,
exits, hostfile, launch, ranks, remote, records, loop, cli); what each does and the design behind them:
docs/resilience.md. The public names of all of them are importable from here.
"""

from ds_trainer.supervisor.cli import main
from ds_trainer.supervisor.exits import NO_HOST_EXIT, REQUEUE_EXIT, USER_ERROR_EXIT, Decision, decide
from ds_trainer.supervisor.hostfile import (
    active_hosts,
    exclusion_filter,
    format_node_spec,
    parse_hostfile,
    parse_node_spec,
)
from ds_trainer.supervisor.launch import Launch, run_dir_of
from ds_trainer.supervisor.loop import Supervisor
from ds_trainer.supervisor.options import Options, backoff_delay, parse_options, split_argv
from ds_trainer.supervisor.ranks import ere_escape, kill_pids, local_leftovers, rank_pattern, signal_matching
from ds_trainer.supervisor.records import (
    EXCLUDED_FILE,
    RESTART_LOG,
    RestartLog,
    now_iso,
    read_excluded,
    record_excluded,
)
from ds_trainer.supervisor.remote import PROBE_SCRIPT, kill_remote_ranks, on_each_host, probe_host

__all__ = [
    "EXCLUDED_FILE",
    "NO_HOST_EXIT",
    "PROBE_SCRIPT",
    "REQUEUE_EXIT",
    "RESTART_LOG",
    "USER_ERROR_EXIT",
    "Decision",
    "Launch",
    "Options",
    "RestartLog",
    "Supervisor",
    "active_hosts",
    "backoff_delay",
    "decide",
    "ere_escape",
    "exclusion_filter",
    "format_node_spec",
    "kill_pids",
    "kill_remote_ranks",
    "local_leftovers",
    "main",
    "now_iso",
    "on_each_host",
    "parse_hostfile",
    "parse_node_spec",
    "parse_options",
    "probe_host",
    "rank_pattern",
    "read_excluded",
    "record_excluded",
    "run_dir_of",
    "signal_matching",
    "split_argv",
]
