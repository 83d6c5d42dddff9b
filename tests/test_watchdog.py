"""The watchdog: a rank without progress dumps every thread's stack and exits; the job goes down."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import REPO, fp32, rank_processes, start_pretrain, tiny_args, wait_for_step

from ds_trainer.watchdog import EXIT_HANG

STUCK = f"""
import sys, threading, time
sys.path.insert(0, {str(REPO)!r})
from ds_trainer.watchdog import Watchdog
threading.Thread(target=time.sleep, args=(60,), name="helper", daemon=True).start()
dog = Watchdog(1.0)
for _ in range(5):
    dog.beat()
    time.sleep(0.3)
print("progress ok", flush=True)
time.sleep(30)
"""


def test_no_progress_dumps_all_stacks_and_exits_nonzero():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_HANG
    assert proc.stdout.strip() == "progress ok"  # regular beats kept it alive
    assert 2.0 < time.monotonic() - started < 45  # 1 s timeout + 1.5 s of beats; slack for a loaded machine
    assert "(timeout 1 s); stacks:" in proc.stderr and "watchdog: rank 0 made no progress" in proc.stderr
    assert proc.stderr.count("Thread 0x") >= 2  # the main thread and the helper thread


@pytest.mark.slow
def test_stopped_rank_takes_the_job_down_within_timeout_plus_30s(tmp_path, verdict_path):
    ds = str(fp32(tmp_path / "ds.json", "zero1"))
    run = tmp_path / "run"
    timeout = 15
    job = start_pretrain(
        ["--ds_config", ds, *tiny_args(run, verdict_path, 400, **{"train.watchdog_timeout": timeout})],
        ranks=2,
        log=tmp_path / "log",
    )
    try:
        wait_for_step(run, 3)
        victim = next(p for p in rank_processes(run) if "--local_rank=1" in p.cmdline())
        victim.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = job.wait(timeout=timeout + 90)
        took = time.monotonic() - stopped_at
        # Before any cleanup of ours: the job itself must have ended every rank, the stopped one too.
        left = psutil.wait_procs(rank_processes(run), timeout=10)[1]
    finally:
        job.kill()
        for p in rank_processes(run):
            p.kill()
    log = (tmp_path / "log").read_text()
    assert code != 0
    assert took < timeout + 30, took
    assert "(timeout 15 s); stacks:" in log and "Thread 0x" in log, log[-3000:]
    assert "killing stopped peer process" in log
    assert [p.cmdline() for p in left] == []
