"""The user's deepspeed arguments, read as DeepSpeed reads them, and the launcher command for an attempt
with excluded hosts left out."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ds_trainer.errors import DsTrainerError
from ds_trainer.supervisor.hostfile import active_hosts, exclusion_filter, parse_hostfile, parse_node_spec
from ds_trainer.supervisor.ranks import rank_pattern

_PRETRAIN_PARSER = argparse.ArgumentParser(add_help=False)
_PRETRAIN_PARSER.add_argument("--config")
_PRETRAIN_PARSER.add_argument("--ds_config")
_PRETRAIN_PARSER.add_argument("--local_rank")


def run_dir_of(script_args: Sequence[str], cwd: Path) -> Path:
    """The run folder the trainer will use: launch/pretrain.py's parsing (`--config` YAML, then
    `--section.key` overrides), so a bad config stops here as it would there (exit 2)."""
    from ds_trainer.config import load_run_config

    known, overrides = _PRETRAIN_PARSER.parse_known_args(list(script_args))
    run = load_run_config(known.config, overrides)
    return (cwd / run.checkpoint.dir).resolve()


def _drop_flags(tokens: Sequence[str], names: set[str], takes_value: bool) -> list[str]:
    out, i = [], 0
    while i < len(tokens):
        name = tokens[i].split("=", 1)[0]
        if name in names:
            i += 1 if ("=" in tokens[i] or not takes_value) else 2
            continue
        out.append(tokens[i])
        i += 1
    return out


@dataclass
class Launch:
    """The user's deepspeed arguments, read with DeepSpeed's own parser, and the command for an attempt."""

    launcher_args: list[str]
    """Options for `deepspeed` itself, before the script."""
    script: str
    script_args: list[str]
    hosts: dict[str, int] | None
    """The hostfile's hosts and slots; None: a local run (no hostfile), nothing to probe or exclude."""
    include: str = ""
    exclude: str = ""
    master_addr: str = ""
    multi_node: bool = False
    """DeepSpeed starts the ranks over ssh (pdsh): more than one host, or --force_multi."""
    ssh_port: int | None = None

    @classmethod
    def parse(cls, deepspeed_args: Sequence[str]) -> Launch:
        from deepspeed.launcher.runner import parse_args

        args = list(deepspeed_args)
        try:
            ns = parse_args(args)
        except SystemExit as e:  # argparse already printed why
            raise DsTrainerError("the deepspeed arguments above could not be read") from e
        if not ns.user_script:
            raise DsTrainerError("no training script given; e.g. launch/resilient.py launch/pretrain.py ...")
        cut = len(args) - len(ns.user_args) - 1
        hosts = None
        if os.path.isfile(ns.hostfile):  # DeepSpeed's rule: a missing hostfile means this machine only
            hosts = parse_hostfile(Path(ns.hostfile).read_text(), ns.hostfile)
            if ns.num_nodes > 0 or ns.num_gpus > 0:
                raise DsTrainerError(
                    "with a hostfile, resilient.py drops failed hosts through --exclude, which DeepSpeed "
                    "cannot combine with --num_nodes/--num_gpus; give the hosts and slots in the hostfile"
                )
        launch = cls(
            launcher_args=args[:cut],
            script=args[cut],
            script_args=list(ns.user_args),
            hosts=hosts,
            include=ns.include,
            exclude=ns.exclude,
            master_addr=ns.master_addr,
            ssh_port=ns.ssh_port,
        )
        if hosts is not None:
            if problems := launch._unknown_hosts():
                raise DsTrainerError("; ".join(problems))
            launch.multi_node = ns.force_multi or len(active_hosts(hosts, ns.include, ns.exclude)) > 1
        return launch

    def _unknown_hosts(self) -> list[str]:
        assert self.hosts is not None
        named = {**parse_node_spec(self.include), **parse_node_spec(self.exclude)}
        return [
            f"--include/--exclude names {h}, which the hostfile lacks" for h in named if h not in self.hosts
        ]

    def candidates(self, excluded: Sequence[str]) -> list[str]:
        """Hosts this launch would use with `excluded` taken out."""
        if self.hosts is None:
            return ["localhost"]
        include, exclude = exclusion_filter(self.include, self.exclude, excluded)
        if self.include and not include:
            return []
        return active_hosts(self.hosts, include, exclude)

    def command(self, excluded: Sequence[str]) -> list[str]:
        """`python -m deepspeed.launcher.runner` (what the `deepspeed` script runs, with this Python) with the
        user's arguments, less the excluded hosts."""
        launcher = list(self.launcher_args)
        excluded = [h for h in excluded if self.hosts and h in self.hosts]
        if excluded:
            left = self.candidates(excluded)
            include, exclude = exclusion_filter(self.include, self.exclude, excluded)
            launcher = _drop_flags(launcher, {"--include", "--exclude", "--master_addr"}, takes_value=True)
            launcher += ["--include", include] if include else ["--exclude", exclude]
            if self.master_addr:
                master = self.master_addr
                if any(_same_host(master, h) for h in excluded):
                    master = left[0]  # rank 0 goes to the first host left; DeepSpeed puts it there
                launcher += ["--master_addr", master]
            if self.multi_node and "--force_multi" not in launcher:
                # One host left would otherwise run its ranks on *this* machine without ssh, which may
                # be the very host just excluded (a batch script runs on the first node).
                launcher.append("--force_multi")
        return [
            sys.executable,
            "-u",
            "-m",
            "deepspeed.launcher.runner",
            *launcher,
            self.script,
            *self.script_args,
        ]

    def rank_pattern(self) -> str | None:
        """A `pkill -f` regex for this run's rank processes on another host (ranks.rank_pattern, the same
        that launch/slurm/pretrain.sbatch uses), named by the run's --checkpoint.dir or else its --config."""
        for flag in ("--checkpoint.dir", "--config"):
            value = _flag_value(self.script_args, flag)
            if value is not None:
                return rank_pattern(self.script, flag, value)
        return None  # nothing on the command line names this run; a pattern could hit other runs


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    value = None  # the last one wins, as in argparse and the override parser
    for i, tok in enumerate(args):
        if tok == flag and i + 1 < len(args):
            value = args[i + 1]
        elif tok.startswith(flag + "="):
            value = tok.split("=", 1)[1]
    return value


def _same_host(addr: str, host: str) -> bool:
    if addr == host:
        return True
    try:
        return socket.gethostbyname(addr) == socket.gethostbyname(host)
    except OSError:
        return False
