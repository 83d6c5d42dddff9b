"""benchmarks/gpu_check.sh end to end on a CPU (SMOKE=1: gpt2-tiny in every row): the plumbing a GPU run
relies on, the launches, the flags and the table, so that its one prepared run on a GPU does not fail on a
typo. fp16 is refused on a CPU, which exercises the rows that fail."""

from __future__ import annotations

import os
import subprocess

import pytest
from helpers import DIST_ENV, REPO


@pytest.mark.slow
def test_gpu_check_runs_every_row_and_prints_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(SMOKE="1", OUT=str(tmp_path), STEPS="8")
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| gpt2")]
    assert len(rows) == 10, proc.stdout
    for name, *cells in rows:
        if "fp16" in name:  # DeepSpeed refuses fp16 on a CPU: the row says so and points at its log
            assert cells[0].startswith("failed: see"), cells
            log = (tmp_path / f"{name.strip('| ').replace(' ', '_')}.log").read_text()
            assert "DeepSpeed does not support fp16 on the CPU" in log
            continue
        tokens, tflops, mfu, _, losses, verdict = cells
        assert float(tokens.replace(",", "")) > 0 and float(tflops) >= 0 and mfu.endswith("%"), cells
        assert verdict.strip(" |") == "yes", (name, losses)
    assert (
        "with torch.compile's compilation" in (tmp_path / "gpt2-medium_zero1_bf16_compiled.log").read_text()
    )
