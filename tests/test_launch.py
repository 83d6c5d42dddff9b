"""launch/pretrain.py as users meet it: bad input gives one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import pytest
from conftest import REPO, run_pretrain, tiny_args, write_ds_config


def assert_one_line_error(proc, *needles: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def args(tmp_path, verdict_path):
    return tiny_args(tmp_path / "run", verdict_path, 2)


def test_missing_ds_config(args, tmp_path):
    proc = run_pretrain(["--ds_config", str(tmp_path / "nope.json"), *args], ranks=0)
    assert_one_line_error(proc, "nope.json", "not found", "--ds_config")


def test_malformed_ds_config(args, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": "auto",\n  "zero_optimization": {"stage": 1,}\n}\n')
    assert_one_line_error(
        run_pretrain(["--ds_config", str(bad), *args], ranks=0), "bad.json", "line 3", "not valid JSON"
    )


def test_unknown_run_config_key(args, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  max_step: 10\n")
    proc = run_pretrain(["--config", str(cfg), *args], ranks=0)
    assert_one_line_error(proc, "run.yaml", "unknown key 'train.max_step'")


def test_unknown_option_and_wrong_type_reported_together(args):
    proc = run_pretrain([*args, "--train.max_stepz", "3", "--train.seed", "abc"], ranks=0)
    assert_one_line_error(proc, "--train.max_stepz", "--train.seed: expected int, got str 'abc'")


def test_batch_sizes_disagree_with_world_size(args, tmp_path):
    ds = write_ds_config(
        tmp_path / "ds.json",
        "zero0",
        bf16={"enabled": False},
        train_batch_size=3,
        train_micro_batch_size_per_gpu=1,
    )
    proc = run_pretrain(["--ds_config", str(ds), *args, "--train.micro_batch_size", "1"], ranks=2)
    # Through the launcher, which passes on the ranks' exit code 2.
    assert_one_line_error(
        proc,
        "train_batch_size=3 is not a multiple of micro batch 1 × 2 data-parallel ranks = 2; make it one (e.g. 2)",
    )


def test_fp16_and_bf16_both_enabled(args, tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", "zero1_fp16", bf16={"enabled": True})
    assert_one_line_error(
        run_pretrain(["--ds_config", str(ds), *args], ranks=0), "fp16.enabled and bf16.enabled"
    )


def test_fp16_on_cpu_explains(args):
    proc = run_pretrain(["--ds_config", str(REPO / "ds_configs" / "zero1_fp16.json"), *args], ranks=0)
    assert_one_line_error(proc, "fp16", "CPU", "bf16")


def test_nvme_path_not_writable(args, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    zero = {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": str(blocker / "nvme")}}
    ds = write_ds_config(tmp_path / "ds.json", "zero3", bf16={"enabled": False}, zero_optimization=zero)
    proc = run_pretrain(["--ds_config", str(ds), *args], ranks=0)
    assert_one_line_error(proc, "zero_optimization.offload_optimizer.nvme_path", "not writable")


def test_missing_data_path(tmp_path):
    proc = run_pretrain(tiny_args(tmp_path / "run", tmp_path / "no_such_corpus", 2), ranks=0)
    assert_one_line_error(proc, "data.path", "no_such_corpus")


def test_corpus_shorter_than_one_window(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words here.")
    proc = run_pretrain(tiny_args(tmp_path / "run", short, 2), ranks=0)
    assert_one_line_error(proc, "fewer than one window", "context_length")


def test_json_and_data_problems_reported_together(tmp_path):
    """A missing corpus does not hide the JSON's problem: the user fixes both after one run."""
    args = tiny_args(tmp_path / "run", tmp_path / "no_such_corpus", 2)
    proc = run_pretrain(["--ds_config", str(REPO / "ds_configs" / "zero1_fp16.json"), *args], ranks=0)
    assert_one_line_error(
        proc, "no_such_corpus", "fp16.enabled=true, but DeepSpeed does not support fp16 on the CPU"
    )


def test_abbreviated_option_is_not_taken_for_another(args, tmp_path):
    """`--conf` is no --config: it names an unknown run-config key."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  max_steps: 1\n")
    proc = run_pretrain(["--conf", str(cfg), *args], ranks=0)
    assert_one_line_error(proc, "--conf")


def test_bad_partition_is_reported_before_any_rank_starts(args, tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", "zero1", bf16={"enabled": False})
    proc = run_pretrain(
        ["--ds_config", str(ds), *args, "--pipeline.stages", "2", "--pipeline.partition", "blocks:5"], ranks=0
    )
    assert_one_line_error(
        proc, "1 ranks cannot be cut into pipeline.stages=2", "pipeline.partition 'blocks:5'"
    )
