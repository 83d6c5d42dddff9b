"""The loss guard: non-finite and spiking steps are withheld; repeated ones roll back to a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import all_tensors, assert_bitwise, fp32, ok, read_metrics, run_pretrain, tiny_args

from ds_trainer.checkpoint import tag_for_step
from ds_trainer.config import GuardSection
from ds_trainer.guard import LossGuard


def test_judge_withholds_nonfinite_and_spikes_after_the_window_fills():
    g = LossGuard(GuardSection(spike_factor=2.0, spike_window=3, rollback_after=2, lr_factor=0.5, lr_steps=4))
    assert g.judge(9.0) is None and g.judge(50.0) is None  # no spike check before 3 good steps
    assert g.judge(math.nan) == "non-finite loss" and g.consecutive == 1
    assert g.judge(8.0) is None and g.consecutive == 0  # the window is now 9, 50, 8: mean 22.3
    assert g.judge(40.0) is None
    assert g.judge(100.0).startswith("loss spike (100.000 > 2 x running mean 32.667)")
    assert g.judge(math.inf) == "non-finite loss" and g.wants_rollback() and g.withheld == 3
    g.lr_cut_until = 10
    assert [g.lr_scale(s) for s in (9, 10, 11)] == [0.5, 0.5, 1.0]
    again = LossGuard(g.settings)
    again.load_state_dict(json.loads(json.dumps(g.state_dict())))  # it travels in checkpoints as JSON-able
    assert again.state_dict() == g.state_dict()


def checkpoint_sampler(run_dir, step: int) -> dict:
    states = torch.load(run_dir / tag_for_step(step) / "mp_rank_00_model_states.pt", weights_only=False)
    return states["ds_trainer"]["sampler"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_injected_nan_leaves_weights_and_optimizer_untouched(tmp_path, verdict_path, stage):
    """NaN on rank 1 only at step 5 (2 ranks): the step's checkpoint equals the one before, bit for bit."""
    ds = str(fp32(tmp_path / "ds.json", f"zero{stage}"))
    run = tmp_path / "run"
    args = ["--ds_config", ds, *tiny_args(run, verdict_path, 6, **{"checkpoint.save_interval": 1})]
    proc = run_pretrain(args, ranks=2, env={"DS_TRAINER_FAULTS": "nan@5:1"})
    ok(proc)
    assert_bitwise(all_tensors(run / tag_for_step(5)), all_tensors(run / tag_for_step(4)))
    with pytest.raises(AssertionError):  # a normal step does change them
        assert_bitwise(all_tensors(run / tag_for_step(6)), all_tensors(run / tag_for_step(5)))
    incidents = [json.loads(line) for line in (run / "incidents.jsonl").read_text().splitlines()]
    assert [(i["step"], i["reason"], i["action"]) for i in incidents] == [
        (5, "non-finite loss", "update withheld")
    ]
    counted = {
        m["step"]: m["incidents/withheld_steps"] for m in read_metrics(run) if "incidents/withheld_steps" in m
    }
    assert counted == {5: 1.0}
    # The withheld step still consumed its data and its place in the schedule.
    assert checkpoint_sampler(run, 5)["consumed"] == 5 * 4


@pytest.mark.slow
def test_repeated_spikes_roll_back_skip_the_data_and_cut_the_lr_reproducibly(tmp_path, verdict_path):
    guard = {
        "guard.spike_factor": 2.0,
        "guard.spike_window": 3,
        "guard.rollback_after": 2,
        "guard.lr_factor": 0.5,
        "guard.lr_steps": 3,
        "checkpoint.save_interval": 4,
        "checkpoint.keep_last": 0,
    }
    ds = str(fp32(tmp_path / "ds.json", "zero1"))
    logs = []
    for name in ("a", "b"):
        run = tmp_path / name
        proc = run_pretrain(
            ["--ds_config", ds, *tiny_args(run, verdict_path, 14, **guard)],
            ranks=0,
            env={"DS_TRAINER_FAULTS": "spike@9,spike@10"},
        )
        ok(proc)
        logs.append(
            [(m["step"], m["train/loss"], m["train/lr"]) for m in read_metrics(run) if "train/loss" in m]
        )
    assert logs[0] == logs[1]  # a rerun with the same faults is the same run
    steps = [s for s, _, _ in logs[0]]
    assert steps == [*range(1, 11), *range(9, 15)]  # 9 and 10 withheld, rolled back to 8, on to 14
    incidents = [json.loads(line) for line in (tmp_path / "a" / "incidents.jsonl").read_text().splitlines()]
    assert [i["step"] for i in incidents] == [9, 10, 10]
    assert incidents[2]["action"].startswith("rolled back to step 8, skipping the data since")
    # The learning rate of the three steps after the rollback is halved, then back on schedule.
    reference = tmp_path / "ref"
    ok(run_pretrain(["--ds_config", ds, *tiny_args(reference, verdict_path, 14)], ranks=0))
    lr_ref = {m["step"]: m["train/lr"] for m in read_metrics(reference) if "train/lr" in m}
    after = {s: lr for s, _, lr in logs[0][10:]}
    assert [after[s] for s in (9, 10, 11)] == pytest.approx([lr_ref[s] * 0.5 for s in (9, 10, 11)])
    assert [after[s] for s in (12, 13, 14)] == pytest.approx([lr_ref[s] for s in (12, 13, 14)])
    # The two withheld steps' windows (2 steps x 2) are never trained on: the position ran ahead by them.
    assert checkpoint_sampler(tmp_path / "a", 12)["consumed"] == (12 + 2) * 2
