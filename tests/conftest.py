"""Test hygiene: offline tokenizer, a known torch-extensions folder, temp run folders, real launcher runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"

# The tests and every rank they launch import this checkout, whichever copy `pip install -e` points at.
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

# Set before any test imports tiktoken or DeepSpeed, and inherited by every launched rank.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ds_trainer_torch_extensions"))

# What /tmp held before the suite: tests/test_hygiene.py checks the suite added nothing but pytest's own root.
TMP_BEFORE = frozenset(os.listdir(tempfile.gettempdir()))
LAST_TEST = "test_hygiene.py::test_the_session_left_no_process_and_no_temporary_file"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The hygiene check runs after every other test, whatever order was chosen (e.g. -p random_order)."""
    items.sort(key=lambda item: item.nodeid.endswith(LAST_TEST))


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """Runs killed during start-up leave DeepSpeed's 64 MiB all-reduce buffers in /dev/shm; sweep them."""
    from ds_trainer.engine import remove_stale_shm_buffers

    remove_stale_shm_buffers()
    yield
    remove_stale_shm_buffers()


@pytest.fixture(scope="session")
def verdict_path() -> Path:
    p = DATA / "the-verdict.txt"
    if not p.is_file():
        pytest.fail(f"{p} is missing: the tests read the shared corpora from ../shared/data")
    return p


def under_ci() -> bool:
    """CI counts as set for any value but empty, `0` or `false`: then a missing service fails, not skips."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ds_config(path: Path, base: str = "zero0", **changes) -> Path:
    """A ds_configs/ file with top-level keys replaced (None removes a key), written to `path`."""
    cfg = json.loads((REPO / "ds_configs" / f"{base}.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))
    return path


def fp32(path: Path, base: str, **changes) -> Path:
    """The ds_configs/ file in fp32: this CPU has no native bf16, so equality tests run in fp32."""
    return write_ds_config(path, base, bf16={"enabled": False}, **changes)


def pretrain_command(args: list[str], ranks: int = 1, env: dict | None = None) -> tuple[list[str], dict]:
    """launch/pretrain.py in one plain process (ranks=0) or under the real `deepspeed` launcher."""
    script = str(REPO / "launch" / "pretrain.py")
    if ranks == 0:
        cmd = [sys.executable, script, *args]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    return cmd, full_env


# Every launch a test makes starts its own process session, so that the whole tree (launcher, ranks, the
# pdsh/ssh clients of a multi-node launch) can be killed at once; `end_launches` kills what is left.
LAUNCHED: list[subprocess.Popen] = []
# Marks every launch of this test session, so the last test can find what it left behind.
SESSION_MARK = "DS_TRAINER_TEST_SESSION"


def launch(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Popen in a new process session, remembered for `end_launches`."""
    full_env = {**(env or os.environ), SESSION_MARK: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=full_env, cwd=kwargs.pop("cwd", REPO), start_new_session=True, **kwargs)
    LAUNCHED.append(proc)
    return proc


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the launch's whole process session (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def run_launch(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Like subprocess.run(capture_output=True, text=True), in its own session, killed whole on timeout."""
    proc = launch(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_session(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_pretrain(
    args: list[str], ranks: int = 1, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd, full_env = pretrain_command(args, ranks, env)
    return run_launch(cmd, full_env, timeout)


def start_pretrain(args: list[str], ranks: int = 1, env: dict | None = None, log: Path | None = None):
    """Like run_pretrain, without waiting: a Popen whose output goes to `log`."""
    cmd, full_env = pretrain_command(args, ranks, env)
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    return launch(cmd, full_env, stdout=out, stderr=subprocess.STDOUT)


def leftover_processes(marker: str) -> list:
    """Live processes of launch/pretrain.py or launch/resilient.py whose command line names `marker`
    (a run folder, the session's temporary root) or whose environment carries this session's mark:
    remote ranks on the test hosts are found by the first, local ones by either."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if not any(a.endswith(("pretrain.py", "resilient.py")) for a in cmd):
            continue
        try:
            marked = proc.environ().get(SESSION_MARK) == str(os.getpid())
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            marked = False
        if marked or any(marker in a for a in cmd):
            found.append(proc)
    return found


def kill_processes(procs: list) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(autouse=True)
def end_launches(request):
    """After every test, passed or failed: kill the sessions it launched and any rank of its run folders
    still alive (remote ranks on the test hosts are not in the local session)."""
    run_root = str(request.getfixturevalue("tmp_path")) if "tmp_path" in request.fixturenames else None
    yield
    while LAUNCHED:
        kill_session(LAUNCHED.pop())
    if run_root is not None:
        kill_processes(leftover_processes(run_root))


def rank_processes(run_dir: Path) -> list:
    """Live rank processes of the run in `run_dir` (their command line names it), stopped ones included."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        is_rank = any(a.endswith("pretrain.py") for a in cmd) and any(
            a.startswith("--local_rank") for a in cmd
        )
        if is_rank and str(run_dir) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> int:
    """Block until metrics.jsonl shows a train step >= `step`; returns the newest step seen."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = run_dir / "metrics.jsonl"
        if f.is_file():
            steps = [json.loads(line)["step"] for line in f.read_text().splitlines() if "train/loss" in line]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} did not reach step {step} in {timeout} s")


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["val/loss"] for m in read_metrics(run_dir) if "val/loss" in m}


def samples(run_dir: Path) -> dict[int, str]:
    """The text generated from eval.sample_prompt at each evaluation, by step."""
    return {m["step"]: m["samples/text"] for m in read_metrics(run_dir) if "samples/text" in m}


def tiny_args(run_dir: Path, data: Path | None, steps: int = 20, **extra: object) -> list[str]:
    """A fast gpt2-tiny run: short context, logging every step, no eval unless asked."""
    opts = {
        "model.preset": "gpt2-tiny",
        **({} if data is None else {"data.path": str(data)}),
        "data.context_length": 32,
        "train.max_steps": steps,
        "train.micro_batch_size": 2,
        "eval.interval": 0,
        "checkpoint.dir": str(run_dir),
        "checkpoint.save_interval": 0,
        "log.interval": 1,
        **extra,
    }
    out = []
    for k, v in opts.items():
        out += [f"--{k}", str(v)]
    return out


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def single_rank_group():
    """One single-rank process group for the session; the variables init_distributed set are handed to
    `process_group` and taken out of the environment again at once, so other tests never see them."""
    import deepspeed.comm as dist

    from ds_trainer.engine import init_distributed

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    init_distributed()
    joined = {k: os.environ[k] for k in DIST_ENV}
    restore_env(saved)
    yield joined
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    dist.cdb = None


@pytest.fixture
def process_group(single_rank_group, monkeypatch):
    """In-process engine tests: the session's process group, and for this test only the rank variables
    DeepSpeed's engine reads (LOCAL_RANK at construction)."""
    for k, v in single_rank_group.items():
        monkeypatch.setenv(k, v)


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def requires_libaio() -> None:
    """NVMe offload needs libaio; outside CI a machine without it skips, under CI=true it must not."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        if under_ci():
            pytest.fail("libaio is missing under CI: .ci/run must apt-get install libaio-dev")
        pytest.skip("libaio missing: apt-get install libaio-dev")


def service(make):
    """Start a tests/services.py service for the session and stop what it started; outside CI a machine
    that cannot run it (not root, packages missing) skips, under CI=true it must not."""
    from services import ServiceUnavailable

    svc = make()
    try:
        svc.start()
    except ServiceUnavailable as e:
        svc.stop()
        if under_ci():
            pytest.fail(f"{e} under CI: .ci/run installs these as root", pytrace=False)
        pytest.skip(str(e))
    except BaseException:
        svc.stop()
        raise
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def ssh_hosts():
    """Hosts node1 and node2 (127.0.0.2, .3), each with its own sshd on port 22, reachable with `ssh`
    and pdsh without prompts; `ssh_hosts.stop_host("node2")` makes one unreachable."""
    from services import SshHosts

    yield from service(SshHosts)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster; SLURM_CONF points at it for the session."""
    from services import SlurmCluster

    yield from service(SlurmCluster)


def all_tensors(folder: Path) -> dict:
    """Every tensor in every DeepSpeed file of a checkpoint, keyed by file and path inside it."""
    import torch

    out = {}

    def walk(obj, key):
        if isinstance(obj, torch.Tensor):
            out[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    for f in sorted(folder.glob("*_states.pt")):
        walk(torch.load(f, map_location="cpu", weights_only=False), f.name)
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
