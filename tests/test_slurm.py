"""launch/slurm/ on a real one-node SLURM: the batch script trains to the end, the chain runs in order."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime

import pytest
from helpers import REPO, fp32, rank_processes, read_metrics, tiny_args

from ds_trainer.process import free_port

SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"
CHAIN = REPO / "launch" / "slurm" / "submit_chain.sh"
STEPS = 4


def job_env(tmp_path, run_dir, verdict_path, steps: int = STEPS) -> dict[str, str]:
    """The script's variables for a tiny one-rank CPU run (--checkpoint.dir comes from RUN_DIR)."""
    args = tiny_args(run_dir, verdict_path, steps)
    i = args.index("--checkpoint.dir")
    del args[i : i + 2]
    return {
        **os.environ,
        "GPUS_PER_NODE": "1",
        "DS_CONFIG": str(fp32(tmp_path / "zero0.json", "zero0")),
        "RUN_DIR": str(run_dir),
        "EXTRA": " ".join(args),
        "MASTER_PORT": str(free_port()),
    }


def steps_logged(run_dir) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir) if "train/loss" in m]


def submit(env: dict[str, str], log) -> str:
    """sbatch the script without waiting; returns the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", str(SBATCH)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


@pytest.mark.slow
def test_sbatch_trains_to_the_end(slurm_cluster, tmp_path, verdict_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "job.log"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--output={log}", str(SBATCH)],
        env=job_env(tmp_path, run_dir, verdict_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{out[-4000:]}"
    job = slurm_cluster.job(proc.stdout.strip().split(";")[0])
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), job
    assert steps_logged(run_dir) == list(range(1, STEPS + 1)), out[-4000:]
    # One rank, launched the single-node way, and the hostfile built from the allocation.
    assert "deepspeed --num_gpus 1 --master_port" in out
    assert (run_dir / f"hostfile.{job['JobId']}").read_text() == f"{slurm_cluster.node} slots=1\n"


@pytest.mark.slow
def test_chain_runs_one_after_the_other(slurm_cluster, tmp_path, verdict_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(CHAIN), "2", f"--output={tmp_path}/%j.log"],
        env=job_env(tmp_path, run_dir, verdict_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split()
    assert slurm_cluster.job(second)["Dependency"] in (f"afterany:{first}(unfulfilled)", f"afterany:{first}")

    a = slurm_cluster.wait_job(first)
    b = slurm_cluster.wait_job(second)
    logs = {j: (tmp_path / f"{j}.log").read_text() for j in (first, second)}
    assert (a["JobState"], a["ExitCode"]) == ("COMPLETED", "0:0"), logs[first][-4000:]
    assert (b["JobState"], b["ExitCode"]) == ("COMPLETED", "0:0"), logs[second][-4000:]
    assert when(b["StartTime"]) >= when(a["EndTime"]), (a["EndTime"], b["StartTime"])
    # The second job found the first one's final checkpoint and had nothing left to train.
    assert "resumed from" in logs[second] and f"at step {STEPS}" in logs[second], logs[second][-4000:]
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes(slurm_cluster, tmp_path, verdict_path):
    """SLURM's warning signal reaches the ranks through the script; the trainer saves and exits 85; the
    script requeues the job, which resumes from the checkpoint and trains each step exactly once."""
    steps = 30
    run_dir = tmp_path / "run"
    log = tmp_path / "job.log"
    job_id = submit(job_env(tmp_path, run_dir, verdict_path, steps), log)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(steps_logged(run_dir)) >= 3:
            break
        assert slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-4000:]
        time.sleep(0.5)
    # The rank is held (SIGSTOP) until the script has forwarded the signal, so the first attempt cannot
    # reach its last step before the signal arrives, however slow SLURM is to deliver it.
    ranks = rank_processes(run_dir)
    assert len(ranks) == 1, log.read_text()[-4000:]
    held_at = max(steps_logged(run_dir))
    for p in ranks:
        p.suspend()
    try:
        # What --signal=B:USR1@120 does near the time limit: USR1 to the batch shell alone.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=60)
        deadline = time.monotonic() + 120
        while "SIGUSR1: forwarding to the ranks" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for p in ranks:
            p.resume()
    assert held_at < steps

    job = slurm_cluster.wait_job(job_id, timeout=600)
    out = log.read_text()
    assert "SIGUSR1: forwarding to the ranks" in out, out[-4000:]
    assert "launcher exited with 85" in out and f"requeueing job {job_id}" in out, out[-4000:]
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), out[-4000:]
    assert "resumed from" in out, out[-4000:]
    assert sorted(steps_logged(run_dir)) == list(range(1, steps + 1)), out[-4000:]


@pytest.mark.slow
def test_search_job_array_shares_one_study(slurm_cluster, postgres_server, tmp_path, verdict_path):
    """launch/slurm/search.sbatch as a 2-task array: both tasks are workers of one PostgreSQL study, and
    the study's four trials run once each."""
    import csv

    study = tmp_path / "study"
    space = tmp_path / "space.yaml"
    space.write_text("train.peak_lr: [1.0e-3, 4.0e-3]\ntrain.warmup_steps: [2, 6]\n")
    args = tiny_args(tmp_path / "unused", verdict_path, 6, **{"eval.interval": 3, "eval.iters": 1})
    i = args.index("--checkpoint.dir")
    del args[i : i + 2]  # each trial's folder is the search's to name
    env = {
        **os.environ,
        "GPUS_PER_NODE": "0",
        "SPACE": str(space),
        "STUDY": str(study),
        "STORAGE": postgres_server.new_database("search_array"),
        "EXTRA": " ".join(args),
    }
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--array=0-1", f"--output={tmp_path}/task_%a.log",
         str(REPO / "launch" / "slurm" / "search.sbatch")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    logs = [(tmp_path / f"task_{a}.log").read_text() for a in (0, 1) if (tmp_path / f"task_{a}.log").exists()]
    assert proc.returncode == 0, f"{proc.stderr}\n" + "\n".join(log[-3000:] for log in logs)
    assert len(logs) == 2 and all("search exited with 0" in log for log in logs), logs
    with (study / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["number"] for r in rows) == ["0", "1", "2", "3"] and {r["state"] for r in rows} == {
        "COMPLETE"
    }
    for n in range(4):  # each trial started once, by one of the tasks
        assert (study / "trials" / f"{n:04d}" / "train.log").read_text().count("ds_trainer 0.1.0 | ") == 1
