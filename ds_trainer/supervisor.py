"""Restart a DeepSpeed run without a person: relaunch after a failure, probe hosts, exclude the bad ones.

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

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import enum
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_trainer.errors import DsTrainerError

# 85, "stopped early with a checkpoint saved, requeue me": defined once, where the trainer returns it.
from ds_trainer.preemption import REQUEUE_EXIT

USER_ERROR_EXIT = DsTrainerError.exit_code  # 2: the config or input is wrong; the same launch fails again
NO_HOST_EXIT = 1
"""Every host of the hostfile is excluded: nothing left to launch on."""

EXCLUDED_FILE = "excluded_hosts"
RESTART_LOG = "restarts.jsonl"

# Run on each host by `probe_host`: torch imports and computes. argv: device (auto|cpu|cuda), slots.
PROBE_SCRIPT = """\
import sys, torch
device, slots = sys.argv[1], int(sys.argv[2])
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device == "cuda" and torch.cuda.device_count() < slots:
    sys.exit(f"{torch.cuda.device_count()} CUDA devices visible, the hostfile gives {slots} slots")
x = torch.ones(64, 64, device=device)
got = (x @ x).sum().item()
if got != 64**3:
    sys.exit(f"64x64 matmul on {device} gave {got}, not {64**3}")
print("ok", torch.__version__, device)
"""


# --------------------------------------------------------------------------------------------- options


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
        description=__doc__,
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


# --------------------------------------------------------------------------------------------- decisions


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


# --------------------------------------------------------------------------------------------- hostfile


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """DeepSpeed's hostfile: `HOST slots=N` per line, `#` comments and blank lines ignored; host order kept
    (it is the rank order). Same rules as deepspeed.launcher.runner._parse_hostfile, as user errors."""
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+)\s+slots=(\d+)", line)
        if not m:
            raise DsTrainerError(f"{source} line {n}: {line!r} is not 'HOST slots=N'")
        if m.group(1) in hosts:
            raise DsTrainerError(f"{source} line {n}: {m.group(1)} is listed twice")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise DsTrainerError(f"{source} lists no hosts; write one 'HOST slots=N' line per node")
    return hosts


def parse_node_spec(spec: str) -> dict[str, list[int]]:
    """DeepSpeed's --include/--exclude: `HOST[:SLOT[,SLOT...]]` joined by `@`; no slots = the whole host."""
    out: dict[str, list[int]] = {}
    for part in filter(None, spec.split("@")):
        host, _, slots = part.partition(":")
        out.setdefault(host, []).extend(int(s) for s in slots.split(",") if s)
    return out


def format_node_spec(spec: dict[str, list[int]]) -> str:
    return "@".join(h + (":" + ",".join(map(str, s)) if s else "") for h, s in spec.items())


def active_hosts(hosts: dict[str, int], include: str = "", exclude: str = "") -> list[str]:
    """Hosts that keep at least one slot under DeepSpeed's --include/--exclude, in hostfile order."""
    if include:
        return [h for h in hosts if h in parse_node_spec(include)]
    dropped = parse_node_spec(exclude)
    left = []
    for h, n in hosts.items():
        if h in dropped and (not dropped[h] or set(range(n)) <= set(dropped[h])):
            continue
        left.append(h)
    return left


def exclusion_filter(include: str, exclude: str, excluded: Sequence[str]) -> tuple[str, str]:
    """(include, exclude) for DeepSpeed with whole `excluded` hosts taken out. DeepSpeed allows only one
    of the two: an --include loses those hosts; otherwise they join --exclude, replacing any slot-level
    entry the user gave for them (DeepSpeed would merge `node2:0` and `node2` into slot 0 only)."""
    if include:
        spec = {h: s for h, s in parse_node_spec(include).items() if h not in excluded}
        return format_node_spec(spec), ""
    spec = {h: s for h, s in parse_node_spec(exclude).items() if h not in excluded}
    spec.update({h: [] for h in excluded})
    return "", format_node_spec(spec)


# --------------------------------------------------------------------------------------------- the launch


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
        """A `pkill -f` regex for this run's rank processes on another host, as launch/slurm/pretrain.sbatch
        builds it: the ranks, and only they, have `SCRIPT --local_rank=N` on their command line."""
        ident = None
        for flag in ("--checkpoint.dir", "--config"):
            value = _flag_value(self.script_args, flag)
            if value is not None:
                ident = f"{ere_escape(flag)}[ =]{ere_escape(value)}( |$)"
                break
        if ident is None:
            return None  # nothing on the command line names this run; a pattern could hit other runs
        return f"{ere_escape(os.path.basename(self.script))} --local_rank=[0-9]+ .*{ident}"


def ere_escape(text: str) -> str:
    """`text` as a literal in a POSIX extended regex (pkill's) that Python's re reads the same way."""
    return re.sub(r"([][.*^$+?(){}|\\])", r"\\\1", text)


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


# --------------------------------------------------------------------------------------------- probes


def probe_host(
    host: str,
    timeout: float,
    *,
    slots: int = 1,
    device: str = "auto",
    ssh_port: int | None = None,
    python: str = sys.executable,
    cwd: str | None = None,
) -> str | None:
    """None when `host` looks able to run ranks, else why not, in a few words. Checks what a launch needs:
    ssh without prompts, the working folder at the same path (DeepSpeed's pdsh command `cd`s there), this
    Python with torch, and one small tensor op on the device."""
    remote = " ".join(
        [
            f"cd {shlex.quote(cwd or os.getcwd())} &&",
            shlex.quote(python),
            "-c",
            shlex.quote(PROBE_SCRIPT),
            shlex.quote(device),
            str(slots),
        ]
    )
    connect = max(1, int(timeout))
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect}"]
    cmd += ["-p", str(ssh_port)] if ssh_port else []
    try:
        r = subprocess.run(
            [*cmd, host, remote], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return f"no answer to the probe within {timeout:g} s"
    except OSError as e:
        return f"ssh could not run: {e}"
    last = (r.stderr.strip().splitlines() or [""])[-1].strip()
    if r.returncode == 255:  # ssh's own failure: connect, auth, host key
        return f"ssh failed: {last or 'exit 255'}"
    if r.returncode != 0:
        return f"probe failed (exit {r.returncode}): {last}"
    if not r.stdout.startswith("ok "):
        return f"probe printed {r.stdout.strip()[:200]!r}"
    return None


# --------------------------------------------------------------------------------------------- records


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")


class RestartLog:
    """One line per event: to stdout (`[time] resilient: ...`) and as JSON to <run>/restarts.jsonl."""

    def __init__(self, run_dir: Path, out=None) -> None:
        self.path = run_dir / RESTART_LOG
        self.out = out if out is not None else sys.stdout

    def event(self, event: str, message: str, **fields: Any) -> None:
        stamp, unix = now_iso(), time.time()
        print(f"[{stamp}] resilient: {message}", file=self.out, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": stamp, "unix": unix, "event": event, **fields}) + "\n")


def read_excluded(run_dir: Path) -> dict[str, str]:
    """Hosts excluded earlier in this run folder: host -> the reason on its line."""
    path = run_dir / EXCLUDED_FILE
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                host, _, rest = line.strip().partition("\t")
                out[host] = rest.partition("\t")[2] or rest  # host, time, reason
    return out


def record_excluded(run_dir: Path, host: str, reason: str) -> None:
    path = run_dir / EXCLUDED_FILE
    head = (
        ""
        if path.exists()
        else "# host<TAB>time<TAB>reason; resilient.py leaves these out; delete a line to readmit\n"
    )
    with open(path, "a") as f:
        f.write(f"{head}{host}\t{now_iso()}\t{reason}\n")


# --------------------------------------------------------------------------------------------- processes


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


def kill_remote_ranks(
    host: str, pattern: str, timeout: float, ssh_port: int | None = None, sig: str = "KILL"
) -> str:
    """`pkill -SIG -f PATTERN` on `host` over ssh: 'killed' (signalled), 'none', or why it could not be done."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout))}"]
    cmd += ["-p", str(ssh_port)] if ssh_port else []
    try:
        r = subprocess.run(
            [*cmd, host, f"pkill -{sig} -f -- {shlex.quote(pattern)}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except (subprocess.TimeoutExpired, OSError) as e:
        return f"unreachable ({type(e).__name__})"
    return {0: "killed", 1: "none"}.get(r.returncode, f"unreachable (exit {r.returncode})")


# --------------------------------------------------------------------------------------------- the loop


def on_each_host(hosts: Sequence[str], fn: Callable[[str], str | None]) -> dict[str, str | None]:
    """fn(host) for every host at once: a dead host costs its timeout once, not once per host."""
    if not hosts:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return dict(zip(hosts, pool.map(fn, hosts), strict=True))


@dataclass
class Supervisor:
    opts: Options
    launch: Launch
    run_dir: Path
    log: RestartLog
    probe: Callable[..., str | None] = probe_host
    sleep: Callable[[float], None] | None = None
    """Waits between attempts; default: sleep in short slices so that a signal ends the wait."""
    env: dict[str, str] | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    _child: subprocess.Popen | None = None
    _stopping: int | None = None

    def run(self) -> int:
        self.excluded = {
            h: r
            for h, r in read_excluded(self.run_dir).items()
            if self.launch.hosts and h in self.launch.hosts
        }
        if self.excluded:
            self.log.event(
                "excluded_earlier",
                f"leaving out {', '.join(self.excluded)} (listed in {self.run_dir / EXCLUDED_FILE})",
                hosts=sorted(self.excluded),
            )
        restarts = 0
        attempt = 0
        while True:
            attempt += 1
            hosts = self._healthy_hosts(attempt)
            if not hosts:
                why = "; ".join(f"{h}: {r}" for h, r in self.excluded.items())
                self.log.event(
                    "stop", f"no host left to launch on ({why})", decision="no_host", exit_code=NO_HOST_EXIT
                )
                print(
                    f"error: no host left to run on: every host of the hostfile is excluded ({why})",
                    file=sys.stderr,
                    flush=True,
                )
                return NO_HOST_EXIT
            cmd = self.launch.command(list(self.excluded))
            self.log.event(
                "launch",
                f"attempt {attempt} on {','.join(hosts)}: {shlex.join(cmd)}",
                attempt=attempt,
                hosts=hosts,
                command=cmd,
            )
            code, pgid = self._run_attempt(cmd)
            decision = decide(code) if self._stopping is None else None
            self.log.event(
                "exit",
                f"attempt {attempt} exited with {code}"
                + (f": {decision.value}" if decision else " after a signal"),
                attempt=attempt,
                exit_code=code,
                decision=decision.value if decision else "signalled",
            )
            if decision is not Decision.SUCCESS:
                self._clean_up(attempt, pgid)
            if decision is None:
                self.log.event(
                    "stop",
                    f"stopped by signal {self._stopping}: not relaunching",
                    decision="signalled",
                    exit_code=code,
                )
                return code
            if decision is not Decision.FAILURE:
                what = {
                    Decision.SUCCESS: "the run finished",
                    Decision.PREEMPTED: "preempted with a checkpoint saved: the scheduler should requeue",
                    Decision.USER_ERROR: "a user error: relaunching cannot help",
                }[decision]
                self.log.event("stop", what, decision=decision.value, exit_code=code)
                return code
            if restarts >= self.opts.max_restarts:
                self.log.event(
                    "stop",
                    f"giving up after {restarts} restart(s) (--max_restarts {self.opts.max_restarts})",
                    decision="give_up",
                    exit_code=code,
                    restarts=restarts,
                )
                return code
            restarts += 1
            delay = backoff_delay(restarts, self.opts.backoff, self.opts.backoff_max)
            self.log.event(
                "restart",
                f"restart {restarts} of {self.opts.max_restarts} in {delay:g} s",
                restart=restarts,
                delay_s=delay,
            )
            (self.sleep or self._interruptible_sleep)(delay)
            if self._stopping is not None:
                self.log.event(
                    "stop",
                    f"stopped by signal {self._stopping} while waiting",
                    decision="signalled",
                    exit_code=128 + self._stopping,
                )
                return 128 + self._stopping

    def _interruptible_sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._stopping is None and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _healthy_hosts(self, attempt: int) -> list[str]:
        """Probe the hosts this launch would use (in parallel) and exclude those that fail; the hosts left."""
        hosts = self.launch.candidates(list(self.excluded))
        if not self.launch.multi_node or self.launch.hosts is None:
            return hosts  # ranks start on this machine, which is evidently up: nothing to probe
        results = on_each_host(
            hosts,
            lambda h: self.probe(
                h,
                self.opts.probe_timeout,
                slots=self.launch.hosts[h],
                device=self.opts.probe_device,
                ssh_port=self.launch.ssh_port,
            ),
        )
        bad = {h: r for h, r in results.items() if r is not None}
        self.log.event(
            "probe",
            f"probed {', '.join(hosts)}: "
            + ("all healthy" if not bad else "; ".join(f"{h}: {r}" for h, r in bad.items())),
            attempt=attempt,
            results={h: r or "ok" for h, r in results.items()},
        )
        for host, reason in bad.items():
            self.excluded[host] = reason
            record_excluded(self.run_dir, host, reason)
            self.log.event("exclude", f"excluding {host}: {reason}", host=host, reason=reason)
        return [h for h in hosts if h not in bad]

    def _run_attempt(self, cmd: list[str]) -> tuple[int, int]:
        """Run the launcher as the leader of a new process group, so that everything it starts on this machine
        can be found (and signalled) as a group; forward SIGTERM/SIGINT to it. Returns (exit code, group)."""
        self._child = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        pgid = self._child.pid
        try:
            code = self._child.wait()
        finally:
            self._child = None
        return (code if code >= 0 else 128 - code), pgid

    def on_signal(self, signum: int, _frame: object = None) -> None:
        """SIGTERM/SIGUSR1/SIGINT to the supervisor: no relaunch, and the signal goes to the ranks themselves,
        which save and exit 85 (the launcher passes that code on). Not to the launcher: it dies of SIGUSR1
        and answers SIGTERM with a second SIGTERM to each rank, which would cut the save short."""
        self._stopping = signum
        child = self._child
        if child is None:
            return
        sig = signal.SIGTERM if signum == signal.SIGINT else signal.Signals(signum)
        pattern = self.launch.rank_pattern()
        if pattern is None:  # the ranks cannot be told apart from other runs': the whole attempt, as a group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            return
        rx = re.compile(pattern)
        for pid in _pids():
            if _alive(pid) and rx.search(" ".join(_proc_cmdline(pid))):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        if self.launch.multi_node and self.launch.hosts:
            name = sig.name.removeprefix("SIG")
            on_each_host(
                list(self.launch.hosts),
                lambda h: kill_remote_ranks(h, pattern, 10.0, self.launch.ssh_port, sig=name),
            )

    def _clean_up(self, attempt: int, pgid: int) -> None:
        """The launcher kills its ranks when one dies; check that nothing of the attempt is left before the
        next one starts (a leftover rank would hold the port, memory and the run folder), and kill what is."""
        pattern = self.launch.rank_pattern()
        local = local_leftovers(pgid, pattern)
        stuck = kill_pids(local)
        remote: dict[str, str] = {}
        if self.launch.multi_node and self.launch.hosts and pattern:
            timeout = min(10.0, self.opts.probe_timeout)
            remote = on_each_host(
                list(self.launch.hosts),
                lambda h: kill_remote_ranks(h, pattern, timeout, self.launch.ssh_port),
            )
        found = [f"{len(local)} local"] + [f"{h}: {r}" for h, r in remote.items()]
        self.log.event(
            "cleanup",
            f"attempt {attempt} leftovers: {', '.join(found)}" + (f"; still alive: {stuck}" if stuck else ""),
            attempt=attempt,
            local_leftovers=len(local),
            remote=remote,
            still_alive=stuck,
        )


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
