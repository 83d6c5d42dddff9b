"""Fixtures and hooks: the environment every test and launched rank runs in, the session's process group,
the services, and ending what a test launched. Shared helpers are in tests/helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import (
    DATA,
    DIST_ENV,
    LAUNCHED,
    REPO,
    TIKTOKEN_CACHE,
    kill_processes,
    kill_session,
    leftover_processes,
    restore_env,
    under_ci,
)

# The tests and every rank they launch import this checkout, whichever copy `pip install -e` points at.
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

# Set before any test imports tiktoken or DeepSpeed, and inherited by every launched rank.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ds_trainer_torch_extensions"))

LAST_TEST = "test_hygiene.py::test_the_session_left_no_process_and_no_temporary_file"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The hygiene check runs after every other test, whatever order was chosen (e.g. -p random_order)."""
    items.sort(key=lambda item: item.nodeid.endswith(LAST_TEST))


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """Runs killed during start-up leave DeepSpeed's 64 MiB all-reduce buffers in /dev/shm; sweep them."""
    from ds_trainer.process import remove_stale_shm_buffers

    remove_stale_shm_buffers()
    yield
    remove_stale_shm_buffers()


@pytest.fixture(scope="session")
def verdict_path() -> Path:
    p = DATA / "the-verdict.txt"
    if not p.is_file():
        pytest.fail(f"{p} is missing: the tests read the shared corpora from ../shared/data")
    return p


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


@pytest.fixture(scope="session")
def single_rank_group():
    """One single-rank process group for the session; the variables init_distributed set are handed to
    `process_group` and taken out of the environment again at once, so other tests never see them."""
    import deepspeed.comm as dist

    from ds_trainer.process import init_distributed

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


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server of its own on 127.0.0.1 and a free port, for the session; `.url` is the
    SQLAlchemy URL of its empty database `optuna` (as `optuna.storages.RDBStorage` takes it), and
    `.new_database(name)` creates another, empty one for a test and returns its URL."""
    from services import PostgresServer

    yield from service(PostgresServer)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny in-process models: one thread is faster, and immune to OpenMP spinning on a busy
    2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
