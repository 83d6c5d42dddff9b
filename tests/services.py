"""Real services for tests, started by the tests and stopped again: ssh hosts and a SLURM cluster for the
launcher, a PostgreSQL server for the hyperparameter search's shared study.

The first two change the machine (daemons, /etc/hosts, ~/.ssh), so every change is recorded when made and
undone in `stop()`, and nothing the machine had before is touched: files get a marked block that is
removed again, daemons already running are used and left running. The PostgreSQL server is a private one
in a temporary folder, beside (never instead of) a system cluster.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ds_trainer.process import free_port

MARK = "ds_trainer tests"
BEGIN = f"# >>> {MARK} >>>"
END = f"# <<< {MARK} <<<"
# The services' state (configs, pid files, logs) lives here, not in /tmp: the suite leaves nothing in /tmp.
STATE_ROOT = Path("/run/ds_trainer_tests")
# Every command a service runs is bounded: a daemon that hangs fails the start instead of the session.
COMMAND_TIMEOUT = 60


class ServiceUnavailable(RuntimeError):
    """The service cannot run here (not root, packages missing, a daemon that will not start)."""


def add_block(path: Path, body: str, mode: int = 0o644) -> None:
    """Put `body` between our markers in `path`, replacing an earlier block (a killed session's)."""
    text = path.read_text() if path.exists() else ""
    text = strip_block(text)
    if text and not text.endswith("\n"):
        text += "\n"
    # Written in place rather than renamed: /etc/hosts is often a bind mount that cannot be replaced.
    with open(path, "w") as f:
        f.write(f"{text}{BEGIN}\n{body.rstrip()}\n{END}\n")
    path.chmod(mode)


def remove_block(path: Path) -> None:
    if path.exists():
        text = path.read_text()
        stripped = strip_block(text)
        if stripped != text:
            with open(path, "w") as f:
                f.write(stripped)


def strip_block(text: str) -> str:
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == BEGIN:
            inside = True
        elif line.strip() == END:
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ServiceUnavailable(f"{what} needs root (daemons, /etc/hosts)")


def require_binaries(what: str, *names: str, apt: str) -> None:
    missing = [n for n in names if not shutil.which(n, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        raise ServiceUnavailable(f"{what}: {', '.join(missing)} not installed (apt-get install {apt})")


def sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def can_bind(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def port_open(addr: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((addr, port)) == 0


def wait_for(check, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise ServiceUnavailable(f"timed out after {timeout:.0f} s waiting for {what}")


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # our daemons' parent may be a init that never reaps them


def kill_pidfile(pidfile: Path, timeout: float = 10) -> None:
    pid = read_pid(pidfile)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- ssh hosts


class SshHosts:
    """Host aliases on loopback addresses, each served by its own sshd so one host can go down alone.

    DeepSpeed's pdsh launcher reaches each hostfile entry with `ssh HOST`, so the aliases resolve through
    /etc/hosts and `~/.ssh/config` gives them a key, no host-key prompts and, when a system sshd already
    holds port 22 on every address, a port of their own.
    """

    HOSTS = {"node1": "127.0.0.2", "node2": "127.0.0.3"}

    def __init__(self, state_dir: Path | None = None):
        self.state = Path(state_dir or STATE_ROOT / "ssh")
        self.ssh_dir = Path.home() / ".ssh"
        self.key = self.ssh_dir / "ds_trainer_tests_ed25519"
        self.ports: dict[str, int] = {}
        self.created_key = False
        self.created_ssh_dir = False
        self.started = False

    # The names the tests use.
    @property
    def aliases(self) -> list[str]:
        return list(self.HOSTS)

    def pidfile(self, alias: str) -> Path:
        return self.state / f"sshd-{alias}.pid"

    def start(self) -> SshHosts:
        require_root("ssh_hosts")
        require_binaries(
            "ssh_hosts", "sshd", "ssh", "ssh-keygen", "pdsh", apt="openssh-server openssh-client pdsh"
        )
        self.started = True  # from here on stop() has things to undo, even if start fails halfway
        self.state.mkdir(parents=True, exist_ok=True)
        # sshd's privilege-separation directory; a fresh container has none until the service first runs.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        if not list(Path("/etc/ssh").glob("ssh_host_*_key")):
            subprocess.run(["ssh-keygen", "-A"], check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
        self._client_key()
        for alias, addr in self.HOSTS.items():
            kill_pidfile(self.pidfile(alias))  # one a killed session left behind
            # Port 22 as on a real cluster, unless a system sshd bound to 0.0.0.0:22 already holds it.
            self.ports[alias] = 22 if can_bind(addr, 22) else free_port(addr)
        add_block(Path("/etc/hosts"), "\n".join(f"{a} {alias}" for alias, a in self.HOSTS.items()))
        add_block(self.ssh_dir / "config", self._client_config(), 0o600)
        for alias in self.HOSTS:
            self.start_host(alias)
        return self

    def _client_key(self) -> None:
        if not self.ssh_dir.exists():
            self.ssh_dir.mkdir(mode=0o700)
            self.created_ssh_dir = True
        if not self.key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", MARK, "-f", str(self.key)],
                check=True,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
            )
            self.created_key = True
        pub = Path(str(self.key) + ".pub").read_text().strip()
        add_block(self.ssh_dir / "authorized_keys", pub, 0o600)

    def _client_config(self) -> str:
        lines = []
        for alias in self.HOSTS:
            lines += [
                f"Host {alias}",
                f"    Port {self.ports[alias]}",
                f"    IdentityFile {self.key}",
                "    IdentitiesOnly yes",
                "    StrictHostKeyChecking no",
                "    UserKnownHostsFile /dev/null",
                "    LogLevel ERROR",
                "    BatchMode yes",
                "    ConnectTimeout 5",
            ]
        return "\n".join(lines)

    def _sshd_config(self, alias: str) -> Path:
        keys = sorted(str(k) for k in Path("/etc/ssh").glob("ssh_host_*_key"))
        # Made again here: a host restarted mid-session must not depend on the folder surviving until then.
        self.state.mkdir(parents=True, exist_ok=True)
        cfg = self.state / f"sshd-{alias}.conf"
        cfg.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.HOSTS[alias]}:{self.ports[alias]}",
                    *(f"HostKey {k}" for k in keys),
                    f"PidFile {self.pidfile(alias)}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "AuthorizedKeysFile .ssh/authorized_keys",
                    # A launch opens several connections at once (check, master address, pdsh, kill).
                    "MaxStartups 64",
                    "UsePAM yes",
                    "",
                ]
            )
        )
        return cfg

    def start_host(self, alias: str) -> None:
        if self.is_up(alias) and alive(read_pid(self.pidfile(alias))):
            return
        log = self.state / f"sshd-{alias}.log"
        subprocess.run(
            [sbin("sshd"), "-f", str(self._sshd_config(alias)), "-E", str(log)],
            check=True,
            timeout=COMMAND_TIMEOUT,
        )
        try:
            wait_for(lambda: self.ssh_ok(alias), 15, f"ssh {alias}")
        except ServiceUnavailable as e:
            raise ServiceUnavailable(
                f"{e}; sshd log: {log.read_text()[-1000:] if log.exists() else ''}"
            ) from None

    def stop_host(self, alias: str) -> None:
        """The host made unreachable: its sshd stopped (sessions already open keep running)."""
        kill_pidfile(self.pidfile(alias))
        wait_for(lambda: not self.is_up(alias), 10, f"{alias}'s sshd to stop")

    def is_up(self, alias: str) -> bool:
        return port_open(self.HOSTS[alias], self.ports[alias])

    def ssh_ok(self, alias: str) -> bool:
        r = subprocess.run(["ssh", alias, "true"], capture_output=True, timeout=20)
        return r.returncode == 0

    def write_hostfile(self, path: Path, slots: int = 1, aliases: list[str] | None = None) -> Path:
        path.write_text("".join(f"{a} slots={slots}\n" for a in aliases or self.aliases))
        return path

    def write_env_file(
        self, path: Path, names=("PATH", "TIKTOKEN_CACHE_DIR", "TORCH_EXTENSIONS_DIR")
    ) -> Path:
        """A `.deepspeed_env` file: the variables pdsh's bare ssh shell lacks; point DS_ENV_FILE at it."""
        path.write_text("".join(f"{n}={os.environ[n]}\n" for n in names if n in os.environ))
        return path

    def stop(self) -> None:
        if not self.started:
            return
        for alias in self.HOSTS:
            kill_pidfile(self.pidfile(alias))
        remove_block(Path("/etc/hosts"))
        remove_block(self.ssh_dir / "config")
        remove_block(self.ssh_dir / "authorized_keys")
        for f in (self.ssh_dir / "config", self.ssh_dir / "authorized_keys"):
            if f.exists() and not f.read_text().strip():
                f.unlink()
        if self.created_key:
            self.key.unlink(missing_ok=True)
            Path(str(self.key) + ".pub").unlink(missing_ok=True)
        if self.created_ssh_dir and not any(self.ssh_dir.iterdir()):
            self.ssh_dir.rmdir()
        shutil.rmtree(self.state, ignore_errors=True)
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()  # only if empty: the SLURM cluster may still use it
        self.started = False


# --------------------------------------------------------------------------------------------- SLURM


class SlurmCluster:
    """A one-node SLURM (slurmctld + slurmd + munged) with its config and state in a temporary folder.

    The node is this host under its short hostname with 2 CPUs; processes are tracked by /proc so no
    cgroup setup is needed; no accounting, so finished jobs are read with `scontrol show job`, kept for
    MinJobAge seconds.
    """

    def __init__(self, cpus: int = 2):
        self.cpus = cpus
        self.dir: Path | None = None
        self.node = socket.gethostname().split(".")[0]
        self.started_munged = False
        self.munged_pidfile = Path("/run/munge/munged.pid")
        self.saved_conf: str | None = None
        self.started = False

    @property
    def conf(self) -> Path:
        assert self.dir is not None
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmCluster:
        require_root("slurm_cluster")
        require_binaries(
            "slurm_cluster", "munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "scontrol",
            apt="slurm-wlm munge",
        )  # fmt: skip
        self.started = True
        self._munge()
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="slurm_", dir=STATE_ROOT))
        (self.dir / "state").mkdir()
        (self.dir / "spool").mkdir()
        self.conf.write_text(self._config())
        self.saved_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        env = {**os.environ, **self.env}
        for daemon in ("slurmctld", "slurmd"):
            # -c: a clean start, ignoring state a killed session may have left (the folder is new anyway).
            r = subprocess.run(
                [sbin(daemon), "-c"], env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
            )
            if r.returncode != 0:
                raise ServiceUnavailable(f"{daemon} did not start: {r.stderr.strip()} {self._logs()}")
        try:
            wait_for(lambda: self.node_state() == "idle", 60, f"SLURM node {self.node} to be idle")
        except ServiceUnavailable as e:
            raise ServiceUnavailable(f"{e}; state {self.node_state()!r}; {self._logs()}") from None
        return self

    def _munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(128))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        if self._munge_ok():
            return
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        for d in (run_dir, Path("/var/lib/munge"), Path("/var/log/munge")):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        # munged refuses to run as root; as its own user it needs no --force.
        r = subprocess.run(
            ["runuser", "-u", "munge", "--", sbin("munged")],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        if r.returncode != 0:
            raise ServiceUnavailable(f"munged did not start: {r.stderr.strip()}")
        self.started_munged = True
        wait_for(self._munge_ok, 10, "munged")

    @staticmethod
    def _munge_ok() -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return (
                subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode
                == 0
            )
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _config(self) -> str:
        d = self.dir
        ctld_port = free_port()
        slurmd_port = free_port()
        while slurmd_port == ctld_port:
            slurmd_port = free_port()
        return f"""\
ClusterName=dstest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only after the credential lifetime (default 120 s); keep tests short.
AuthInfo=cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge=3600
KillWait=10
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.dir / name if self.dir else None
            if p and p.exists():
                out.append(f"{name}: ...{p.read_text()[-800:]}")
        return " ".join(out)

    def node_state(self) -> str:
        r = subprocess.run(
            ["sinfo", "-h", "-n", self.node, "-o", "%T"],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=COMMAND_TIMEOUT,
        )
        return r.stdout.strip()

    def scontrol(self, *args: str) -> str:
        r = subprocess.run(
            ["scontrol", *args],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **self.env},
            timeout=COMMAND_TIMEOUT,
        )
        return r.stdout

    def job(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StartTime, EndTime, ...)."""
        out = self.scontrol("show", "job", "-o", str(job_id))
        fields = {}
        for token in out.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait_job(self, job_id: str | int, timeout: float = 600) -> dict[str, str]:
        done = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def stop(self) -> None:
        if not self.started:
            return
        if self.dir is not None:
            env = {**os.environ, **self.env}
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                # Our private cluster: every job on it is ours. Cancel, then let slurmd reap the steps.
                subprocess.run(
                    ["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=20
                )
                with contextlib.suppress(ServiceUnavailable):
                    wait_for(
                        lambda: (
                            not subprocess.run(
                                ["squeue", "-h"], env=env, capture_output=True, text=True, timeout=10
                            ).stdout.strip()
                        ),
                        30,
                        "jobs to end",
                        interval=0.5,
                    )
            kill_pidfile(self.dir / "slurmd.pid")
            kill_pidfile(self.dir / "slurmctld.pid")
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                STATE_ROOT.rmdir()  # only if empty: the ssh hosts may still use it
        if self.saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self.saved_conf
        if self.started_munged:
            kill_pidfile(self.munged_pidfile)
        self.started = False


# --------------------------------------------------------------------------------------------- PostgreSQL


class PostgresServer:
    """A private PostgreSQL server on 127.0.0.1 and a free port, its data in a temporary folder, with an
    empty database `optuna`; any user connects as `postgres` without a password (trust).

    Debian's `postgresql` package puts the server binaries under /usr/lib/postgresql/<version>/bin, off
    PATH. The server refuses to run as root, so initdb and pg_ctl run as the package's `postgres` user. Its
    sockets live in the temporary folder, so a system cluster (on 5432, /var/run/postgresql) is never
    touched, running or not.
    """

    BIN_GLOB = "/usr/lib/postgresql/*/bin"
    APT = "postgresql"
    USER = "postgres"

    def __init__(self, database: str = "optuna"):
        self.database = database
        self.dir: Path | None = None
        self.bin: Path | None = None
        self.port: int | None = None
        self.started = False

    def _in_dir(self, name: str) -> Path:
        assert self.dir is not None, "start() makes the folder"
        return self.dir / name

    data = property(lambda self: self._in_dir("data"), doc="The cluster's data folder (initdb's -D).")
    log = property(lambda self: self._in_dir("postgres.log"), doc="The server's log (pg_ctl's -l).")

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the database `optuna` (what `optuna.storages.RDBStorage` takes)."""
        return self._url(self.database)

    def _url(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.USER}@127.0.0.1:{self.port}/{database}"

    @classmethod
    def find_bin(cls) -> Path:
        """The newest installed version's bin folder that has initdb, pg_ctl and postgres."""

        def version(d: Path) -> tuple[int, ...]:
            v = d.parent.name
            return tuple(int(x) for x in v.split(".")) if v.replace(".", "").isdigit() else (-1,)

        names = ("initdb", "pg_ctl", "postgres")
        for d in sorted((Path(p) for p in glob.glob(cls.BIN_GLOB)), key=version, reverse=True):
            if all((d / n).is_file() and os.access(d / n, os.X_OK) for n in names):
                return d
        raise ServiceUnavailable(
            f"postgres_server: {', '.join(names)} not installed under {cls.BIN_GLOB} (apt-get install {cls.APT})"
        )

    def start(self) -> PostgresServer:
        require_root("postgres_server")
        require_binaries("postgres_server", "runuser", apt="util-linux")
        self.bin = self.find_bin()
        try:
            pw = pwd.getpwnam(self.USER)
        except KeyError:
            raise ServiceUnavailable(
                f"postgres_server: no user {self.USER} (apt-get install {self.APT} creates it)"
            ) from None
        self.started = True  # from here on stop() has things to undo, even if start fails halfway
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        # The postgres user must pass through to its folder, whatever the umask made of STATE_ROOT.
        STATE_ROOT.chmod(STATE_ROOT.stat().st_mode | 0o111)
        self.dir = Path(tempfile.mkdtemp(prefix="postgres_", dir=STATE_ROOT))
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        # No locale: initdb fails on a LANG the machine has not generated. No fsync: test data is disposable.
        self._as_postgres(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", self.USER, "-E", "UTF8", "--no-locale",
            "--no-sync", what="initdb",
        )  # fmt: skip
        for attempt in range(3):
            # Another process may take the free port before the server binds it; then try another.
            self.port = free_port("127.0.0.1")
            with open(self.data / "postgresql.conf", "a") as f:  # the last setting of a name wins
                f.write(
                    f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                )
            try:
                self._as_postgres(
                    "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                    what="pg_ctl start",
                )  # fmt: skip
                break
            except ServiceUnavailable:
                if attempt == 2 or "already in use" not in self._log_tail():
                    raise
        wait_for(lambda: port_open("127.0.0.1", self.port), 30, f"PostgreSQL on port {self.port}")
        self.new_database(self.database)
        return self

    def _as_postgres(self, tool: str, *args: str, what: str) -> None:
        assert self.bin is not None and self.dir is not None
        # cwd: the postgres user may not be allowed into the caller's folder.
        r = subprocess.run(
            ["runuser", "-u", self.USER, "--", str(self.bin / tool), *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT + 30,
        )
        if r.returncode != 0:
            raise ServiceUnavailable(
                f"postgres_server: {what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-1000:]}"
                f"; log: {self._log_tail()}"
            )

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-1000:]
        except (OSError, AssertionError):
            return ""

    def new_database(self, name: str) -> str:
        """Create the empty database `name` (an error if it exists) and return its SQLAlchemy URL."""
        assert self.bin is not None and self.port is not None
        r = subprocess.run(
            [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, name],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        if r.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {r.stderr.strip()}")
        return self._url(name)

    def _server_pids(self) -> list[int]:
        """The postmaster and its children: every process whose command line names our data folder, or
        whose parent is one of those (the children are renamed `postgres: checkpointer` and the like)."""
        data = str(self.data)
        procs: dict[int, tuple[int, str]] = {}
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            procs[int(p.name)] = (ppid, cmd)
        ours = {pid for pid, (_, cmd) in procs.items() if data in cmd.split() and "postgres" in cmd}
        ours |= {pid for pid, (ppid, _) in procs.items() if ppid in ours}
        return sorted(pid for pid in ours if alive(pid))

    def stop(self) -> None:
        if not self.started:
            return
        if self.dir is not None and self.data.exists():
            pids = self._server_pids()
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(ServiceUnavailable, OSError, subprocess.SubprocessError):
                    self._as_postgres(
                        "pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30",
                        what="pg_ctl stop",
                    )  # fmt: skip
            pids += self._server_pids()
            with contextlib.suppress(ServiceUnavailable):
                wait_for(lambda: not any(alive(p) for p in pids), 15, "PostgreSQL to end", interval=0.1)
            for pid in pids:  # pg_ctl failed or timed out: what is left is killed
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ServiceUnavailable):
                wait_for(lambda: not any(alive(p) for p in pids), 10, "PostgreSQL to die", interval=0.1)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            with contextlib.suppress(OSError):
                STATE_ROOT.rmdir()  # only if empty: the other services may still use it
        self.started = False
