"""Where numbers go: rank 0 only, the console line's form, and the fp16 loss scale's source."""

from __future__ import annotations

import json

import pytest

from ds_trainer.metrics import Metrics, console_line, format_duration


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0m00s"), (59.9, "0m59s"), (75, "1m15s"), (3599, "59m59s"), (3900, "1h05m"), (-3, "0m00s")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_console_line_has_the_documented_form():
    line = console_line(120, 5000, 1, 4.21349, 5.94e-4, 812.4, 1262.2, 3900)
    assert line == "step 120/5000 | epoch 1 | loss 4.213 | lr 5.9e-04 | 812 ms/step | 1,262 tok/s | eta 1h05m"


def test_only_rank_0_writes_and_prints(tmp_path, capsys):
    for rank in (1, 0):
        m = Metrics.for_rank(rank, tmp_path / f"tb{rank}", tmp_path / f"m{rank}.jsonl")
        m.scalars(3, {"train/loss": 2.5})
        m.text(3, "samples/text", "hello")
        m.print_line(f"line from rank {rank}")
        m.close()
    assert not (tmp_path / "tb1").exists() and not (tmp_path / "m1.jsonl").exists()
    assert capsys.readouterr().out == "line from rank 0\n"
    rows = [json.loads(line) for line in (tmp_path / "m0.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("train/loss"), r.get("samples/text")) for r in rows] == [
        (3, 2.5, None),
        (3, None, "hello"),
    ]
    assert len(list((tmp_path / "tb0").glob("events.out.tfevents.*"))) == 1


def test_every_fp16_optimizer_of_deepspeed_has_the_loss_scale_the_trainer_logs():
    """fp16 runs only on a GPU, so this checks on the classes that the attribute read exists for each layout."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # ds_trainer/trainer.py logs float(engine.optimizer.loss_scale) for fp16 runs.
    for cls in (FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(getattr(cls, "loss_scale", None), property), f"{cls.__name__} has no loss_scale"
