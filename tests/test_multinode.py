"""Two "nodes" on one machine through the real multi-node path: hostfile, ssh, pdsh, .deepspeed_env."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import REPO, fp32, free_port, losses, run_pretrain, tiny_args

STEPS = 6


def rank_pids(run_dir) -> list[int]:
    """This run's rank processes: `pretrain.py --local_rank=N` with its folder on the command line."""
    r = subprocess.run(
        ["pgrep", "-f", f"pretrain.py --local_rank=.*{run_dir}"], capture_output=True, text=True
    )
    return [int(p) for p in r.stdout.split()]


@pytest.mark.slow
def test_two_nodes_match_two_local_ranks(ssh_hosts, tmp_path, verdict_path):
    ds = fp32(tmp_path / "zero3.json", "zero3")
    hostfile = ssh_hosts.write_hostfile(tmp_path / "hostfile", slots=1)
    # pdsh's ssh shell starts bare; DeepSpeed exports what this file lists to every node.
    env_file = ssh_hosts.write_env_file(tmp_path / "deepspeed_env")

    multi = tmp_path / "multi"
    cmd = [
        "deepspeed",
        "--hostfile", str(hostfile),
        "--launcher", "pdsh",
        "--master_addr", ssh_hosts.HOSTS["node1"],
        "--master_port", str(free_port()),
        str(REPO / "launch" / "pretrain.py"),
        "--ds_config", str(ds),
        *tiny_args(multi, verdict_path, STEPS),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ENV_FILE": str(env_file)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Both hosts ran a rank: pdsh prefixes each remote line with its host.
    assert "node1:" in out and "node2:" in out, out[-4000:]

    local = tmp_path / "local"
    ref = run_pretrain(["--ds_config", str(ds), *tiny_args(local, verdict_path, STEPS)], ranks=2)
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-4000:]

    got, want = losses(multi), losses(local)
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(want) == sorted(got)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got, want)

    deadline = time.monotonic() + 15
    while rank_pids(multi) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rank_pids(multi) == [], "rank processes outlived the launcher"
