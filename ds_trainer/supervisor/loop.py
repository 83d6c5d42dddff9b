"""The relaunch loop: probe, launch, read the exit code, clean up, wait, relaunch; and the signals that stop
it. How the pieces fit together: docs/resilience.md."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ds_trainer.supervisor.exits import NO_HOST_EXIT, Decision, decide
from ds_trainer.supervisor.launch import Launch
from ds_trainer.supervisor.options import Options, backoff_delay
from ds_trainer.supervisor.ranks import kill_pids, local_leftovers, signal_matching
from ds_trainer.supervisor.records import EXCLUDED_FILE, RestartLog, read_excluded, record_excluded
from ds_trainer.supervisor.remote import kill_remote_ranks, on_each_host, probe_host

_STOP_MESSAGES = {
    Decision.SUCCESS: "the run finished",
    Decision.PREEMPTED: "preempted with a checkpoint saved: the scheduler should requeue",
    Decision.USER_ERROR: "a user error: relaunching cannot help",
}


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
        self._read_excluded()
        restarts = 0
        attempt = 0
        while True:
            attempt += 1
            hosts = self._healthy_hosts(attempt)
            if not hosts:
                return self._no_host_left()
            code, decision = self._attempt(attempt, hosts)
            stop = self._stop_code(code, decision)
            if stop is not None:
                return stop
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
            stop = self._wait_before(restarts)
            if stop is not None:
                return stop

    def _read_excluded(self) -> None:
        """Hosts this run folder's excluded_hosts lists (and the hostfile has) stay out from the start."""
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

    def _no_host_left(self) -> int:
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

    def _attempt(self, attempt: int, hosts: list[str]) -> tuple[int, Decision | None]:
        """Launch on `hosts`, wait for the launcher, clean up after it unless the run finished. Returns its
        exit code and what that means (None: the supervisor was signalled meanwhile)."""
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
        return code, decision

    def _stop_code(self, code: int, decision: Decision | None) -> int | None:
        """The supervisor's exit code when this attempt ends the run (all but a failure), else None."""
        if decision is None:
            self.log.event(
                "stop",
                f"stopped by signal {self._stopping}: not relaunching",
                decision="signalled",
                exit_code=code,
            )
            return code
        if decision is not Decision.FAILURE:
            self.log.event("stop", _STOP_MESSAGES[decision], decision=decision.value, exit_code=code)
            return code
        return None

    def _wait_before(self, restarts: int) -> int | None:
        """The back-off before relaunch number `restarts`; the exit code if a signal came meanwhile."""
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
        return None

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
        signal_matching(pattern, sig)
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
