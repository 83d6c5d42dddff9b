"""Two "nodes" on one machine through the real multi-node path: hostfile, ssh, pdsh, .deepspeed_env."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from helpers import REPO, SGD_LR, assert_same_training, run_pretrain, sgd, tiny_args, val_losses

from ds_trainer.process import free_port
from ds_trainer.supervisor import rank_pattern

STEPS = 6


def rank_pids(run_dir) -> list[int]:
    """This run's rank processes, found by pgrep with the pattern the batch script and supervisor use."""
    pattern = rank_pattern("pretrain.py", "--checkpoint.dir", str(run_dir))
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=60)
    return [int(p) for p in r.stdout.split()]


def launch_on_two_nodes(ssh_hosts, tmp_path, slots: int, args: list[str]) -> str:
    """`deepspeed --hostfile` over node1 and node2 through pdsh; returns the launcher's output."""
    hostfile = ssh_hosts.write_hostfile(tmp_path / "hostfile", slots=slots)
    # pdsh's ssh shell starts bare; DeepSpeed exports what this file lists to every node.
    env_file = ssh_hosts.write_env_file(tmp_path / "deepspeed_env")
    cmd = [
        "deepspeed",
        "--hostfile", str(hostfile),
        "--launcher", "pdsh",
        "--master_addr", ssh_hosts.HOSTS["node1"],
        "--master_port", str(free_port()),
        str(REPO / "launch" / "pretrain.py"),
        *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ENV_FILE": str(env_file)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Both hosts ran ranks: pdsh prefixes each remote line with its host.
    assert "node1:" in out and "node2:" in out, out[-4000:]
    return out


def assert_no_ranks_left(run_dir) -> None:
    deadline = time.monotonic() + 15
    while rank_pids(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rank_pids(run_dir) == [], "rank processes outlived the launcher"


@pytest.mark.slow
def test_two_nodes_match_two_local_ranks(ssh_hosts, tmp_path, verdict_path):
    """Plain SGD, whose update moves with the gradient's scale: a gradient that ranks on different hosts
    average differently from local ranks changes every loss, gradient norm and weight."""
    ds = sgd(tmp_path / "zero3.json", "zero3")
    extra = {"train.peak_lr": SGD_LR}
    multi = tmp_path / "multi"
    launch_on_two_nodes(
        ssh_hosts, tmp_path, 1, ["--ds_config", str(ds), *tiny_args(multi, verdict_path, STEPS, **extra)]
    )

    local = tmp_path / "local"
    ref = run_pretrain(["--ds_config", str(ds), *tiny_args(local, verdict_path, STEPS, **extra)], ranks=2)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-4000:]

    assert_same_training(multi, local, STEPS, loss_atol=1e-6)
    assert_no_ranks_left(multi)


@pytest.mark.slow
def test_pipeline_stages_on_two_nodes_match_plain_data_parallel(ssh_hosts, tmp_path, verdict_path):
    """2 stages x 2 data-parallel ranks with 2 slots per host: DeepSpeed's topology puts stage 0 on
    ranks 0-1 (node1) and stage 1 on ranks 2-3 (node2), so activations and the tied embedding's
    gradient cross hosts. The same global batch (micro 2 x 2 micro-batches x 2) on 2 local ranks
    without a pipeline gives the same losses, gradient norms and weights under plain SGD, and evaluation
    and sampling run through the stages."""
    ds = sgd(tmp_path / "zero1.json", "zero1")
    extra = {
        "train.gradient_accumulation_steps": 2,
        "train.peak_lr": SGD_LR,
        "eval.interval": STEPS,
        "eval.iters": 2,
        "eval.sample_tokens": 4,
    }
    multi = tmp_path / "multi"
    out = launch_on_two_nodes(
        ssh_hosts,
        tmp_path,
        2,
        [
            "--ds_config", str(ds),
            *tiny_args(multi, verdict_path, STEPS, **extra),
            "--pipeline.stages", "2",
            "--pipeline.partition", "blocks:1,1",
        ],
    )  # fmt: skip
    assert "ZeRO-1 fp32 on 4 rank(s) (2 pipeline stages x 2 data-parallel)" in out, out[-4000:]
    assert out.count(f"sample step {STEPS}") == 1, out[-4000:]

    local = tmp_path / "local"
    ref = run_pretrain(["--ds_config", str(ds), *tiny_args(local, verdict_path, STEPS, **extra)], ranks=2)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-4000:]

    assert_same_training(multi, local, STEPS)
    val = [val_losses(d) for d in (multi, local)]
    assert sorted(val[0]) == sorted(val[1]) == [1, STEPS], val  # after the first update, and the last
    assert val[0][STEPS] == pytest.approx(val[1][STEPS], abs=1e-5), val
    assert_no_ranks_left(multi)
