"""The GPT as a DeepSpeed pipeline: partitions, and 2 stages on 2 ranks against the plain model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import fp32, losses, read_metrics, run_pretrain, tiny_args, val_losses

from ds_trainer.errors import DsTrainerError
from ds_trainer.pipeline import parse_partition


def test_partition_methods():
    assert parse_partition("parameters", 12, 2) == "parameters"
    assert parse_partition("uniform", 12, 4) == "uniform"
    # layers: embedding, 12 blocks, final LayerNorm, head = 15; stage 0 gets the embedding + 5 blocks
    assert parse_partition("blocks:5,7", 12, 2) == [0, 6, 15]
    assert parse_partition("blocks:2,4,4,2", 12, 4) == [0, 3, 7, 11, 15]
    for bad in ("blocks:6,5", "blocks:12,0", "blocks:a,b", "blocks:4,4,4"):
        with pytest.raises(DsTrainerError, match="must list 2 positive block counts summing to 12"):
            parse_partition(bad, 12, 2)
    with pytest.raises(DsTrainerError, match="unknown"):
        parse_partition("type:Block", 12, 2)


@pytest.mark.slow
def test_two_stages_match_the_plain_model_and_resume(tmp_path, verdict_path):
    """Explicit `blocks:` bounds and 2 data-parallel pipelines run in tests/test_multinode.py."""
    ds = str(fp32(tmp_path / "ds.json", "zero1"))
    extra = {
        "train.gradient_accumulation_steps": 2,
        "train.peak_lr": 3e-3,
        "eval.interval": 10,
        "eval.iters": 2,
        "eval.sample_tokens": 4,
        "checkpoint.save_interval": 10,
    }
    plain, piped = tmp_path / "plain", tmp_path / "piped"
    proc = run_pretrain(["--ds_config", ds, *tiny_args(plain, verdict_path, 20, **extra)], ranks=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    piped_args = [
        "--ds_config",
        ds,
        *tiny_args(piped, verdict_path, 20, **extra),
        "--pipeline.stages",
        "2",
        "--pipeline.partition",
        "parameters",
    ]
    proc = run_pretrain(piped_args, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 pipeline stages x 1 data-parallel" in proc.stdout
    assert proc.stdout.count("sample step") == 2  # generation runs through the stages
    a, b = losses(plain), losses(piped)
    assert sorted(b) == list(range(1, 21))
    np.testing.assert_allclose([b[s] for s in range(1, 21)], [a[s] for s in range(1, 21)], atol=1e-3, rtol=0)
    np.testing.assert_allclose(list(val_losses(piped).values()), list(val_losses(plain).values()), atol=1e-3)

    # Resume: back to the step-10 checkpoint, then the same command finishes the run identically.
    shutil.rmtree(piped / "step_00000020")
    (piped / "latest").write_text("step_00000010")
    before = losses(piped)
    proc = run_pretrain(piped_args, ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 10" in proc.stdout
    after = {m["step"]: m["train/loss"] for m in read_metrics(piped)[-30:] if "train/loss" in m}
    assert [after[s] for s in range(11, 21)] == [before[s] for s in range(11, 21)]
