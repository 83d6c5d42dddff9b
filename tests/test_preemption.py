"""Preemption: signals and the time limit stop every rank at the same step with a checkpoint and exit 85."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    REPO,
    fp32,
    ok,
    rank_processes,
    read_metrics,
    run_pretrain,
    start_pretrain,
    tiny_args,
    wait_for_step,
)

from ds_trainer.checkpoint import tag_for_step
from ds_trainer.preemption import REQUEUE_EXIT

FORCED = f"""
import os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
from ds_trainer.collectives import Group
from ds_trainer.preemption import StopRequest
stop = StopRequest(None, grace_s=float(sys.argv[1]), group=Group(1))
stop.install()
print("armed", time.time(), flush=True)
for _ in range(int(sys.argv[2])):
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.1)
time.sleep(10)
print("still here", stop.received)
"""


@pytest.mark.parametrize(
    ("grace", "signals", "code"),
    [(30, 1, 0), (30, 2, 128 + signal.SIGUSR1), (0.5, 1, 128 + signal.SIGUSR1)],
    ids=["one-signal-waits-for-the-loop", "second-signal-forces-exit", "grace-period-forces-exit"],
)
def test_signal_sets_a_flag_and_a_second_or_the_grace_period_forces_exit(grace, signals, code):
    proc = subprocess.run(
        [sys.executable, "-c", FORCED, str(grace), str(signals)], capture_output=True, text=True, timeout=60
    )
    ended = time.time()
    assert proc.returncode == code, proc.stderr
    lines = proc.stdout.splitlines()
    armed = float(lines[0].split()[1])
    if code == 0:
        assert lines[1:] == [f"still here {int(signal.SIGUSR1)}"]
    else:
        assert len(lines) == 1 and ended - armed < 8  # before the 10 s sleep ends, with slack for load


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_both_with_a_checkpoint_and_the_requeue_code(tmp_path, verdict_path):
    """Only rank 1 is signalled: the ranks agree at the next step boundary, save, and exit 85; the same
    command then resumes at that step and finishes."""
    ds = str(fp32(tmp_path / "ds.json", "zero1"))
    run = tmp_path / "run"
    args = ["--ds_config", ds, *tiny_args(run, verdict_path, 400)]
    job = start_pretrain(args, ranks=2, log=tmp_path / "log")
    try:
        wait_for_step(run, 3)
        ranks = rank_processes(run)
        assert len(ranks) == 2
        victim = next(p for p in ranks if "--local_rank=1" in p.cmdline())
        seen = wait_for_step(run, 0)
        victim.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=120) == REQUEUE_EXIT, (tmp_path / "log").read_text()[-3000:]
    finally:
        job.kill()
    log = (tmp_path / "log").read_text()
    stopped = int((run / "latest").read_text().removeprefix("step_"))
    assert seen <= stopped <= seen + 2, (seen, stopped)  # within the step in flight and the next
    assert f"stopping at step {stopped}: received SIGUSR1" in log
    assert rank_processes(run) == []
    proc = run_pretrain(["--ds_config", ds, *tiny_args(run, verdict_path, stopped + 2)], ranks=2)
    ok(proc)
    assert f"resumed from {run / tag_for_step(stopped)} at step {stopped}" in proc.stdout
    assert max(m["step"] for m in read_metrics(run)) == stopped + 2


@pytest.mark.slow
def test_time_limit_saves_and_exits_before_it_runs_out(tmp_path, verdict_path):
    run = tmp_path / "run"
    limit = 45.0
    started = time.monotonic()
    proc = run_pretrain(tiny_args(run, verdict_path, 100000, **{"train.time_limit": limit}), ranks=0)
    elapsed = time.monotonic() - started
    assert proc.returncode == REQUEUE_EXIT, proc.stderr[-2000:]
    stopped = int((run / "latest").read_text().removeprefix("step_"))
    assert 1 <= stopped < 100000
    assert f"stopping at step {stopped}: the time limit of 45 s is near" in proc.stdout
    assert elapsed < limit, elapsed
