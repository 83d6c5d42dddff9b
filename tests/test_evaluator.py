"""Evaluation as the books do it: after the first update and every interval, training and validation loss
in eval mode over fixed windows; samples with each evaluation or at each epoch's end."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import final_weights, fp32, ok, read_metrics, run_pretrain, tiny_args

from ds_trainer.data import build_datasets
from ds_trainer.model import GPT, GPTConfig

BATCH, CONTEXT, STEPS = 8, 64, 10


def loss_of(model: GPT, data, count: int) -> float:
    x, y = data.batch(data.eval_ids(0, count))
    with torch.no_grad():
        return float(model(x, y))


@pytest.mark.slow
def test_evaluation_reports_train_and_val_loss_in_eval_mode_and_samples_each_epoch(tmp_path, verdict_path):
    run = tmp_path / "run"
    extra = {
        "data.context_length": CONTEXT,
        "train.micro_batch_size": BATCH,
        "model.dropout": 0.2,  # eval mode must switch it off, or the losses below would differ
        "eval.interval": 4,
        "eval.iters": 1,
        "eval.sample_every_epoch": True,
        "eval.sample_prompt": "Every effort moves you",
        "eval.sample_tokens": 5,
        "eval.temperature": 0,
        "log.interval": 3,
    }
    proc = run_pretrain(
        [
            "--ds_config",
            str(fp32(tmp_path / "ds.json", "zero0")),
            *tiny_args(run, verdict_path, STEPS, **extra),
        ],
        ranks=0,
    )
    ok(proc)
    records = read_metrics(run)
    evals = {m["step"]: m for m in records if "val/loss" in m}
    assert sorted(evals) == [1, 4, 8, 10]  # after the first update, every 4 steps, and the last
    windows = int(re.search(r"([\d,]+) train windows", proc.stdout).group(1).replace(",", ""))
    for step, m in evals.items():
        assert m["eval/epoch"] == pytest.approx(step * BATCH / windows)
        assert m["eval/tokens_seen"] == step * BATCH * CONTEXT

    # The last evaluation's losses are the final weights' on the first window of each split, in eval mode.
    cfg = GPTConfig.from_preset("gpt2-tiny", dropout=0.2)
    model = GPT(cfg)
    model.load_state_dict(final_weights(run, STEPS))
    model.eval()
    train, val, _ = build_datasets({str(verdict_path): 1.0}, CONTEXT, CONTEXT, None, cfg.vocab_size)
    assert evals[STEPS]["eval/train_loss"] == pytest.approx(loss_of(model, train, BATCH), rel=1e-5)
    assert evals[STEPS]["val/loss"] == pytest.approx(loss_of(model, val, BATCH), rel=1e-5)
    assert f"eval step {STEPS} | train loss {evals[STEPS]['eval/train_loss']:.3f} | val loss" in proc.stdout

    # Samples come at the ends of epochs only (not with every evaluation), greedy at temperature 0.
    samples = {m["step"]: m["samples/text"] for m in records if "samples/text" in m}
    ends = [s for s in range(1, STEPS + 1) if s * BATCH // windows > (s - 1) * BATCH // windows]
    assert ends and sorted(samples) == ends
    assert all(t.startswith("Every effort moves you") for t in samples.values())

    # The logged loss is the mean over the log interval; the step's own is train/step_loss.
    logged = {m["step"]: m for m in records if "train/loss" in m}
    assert sorted(logged) == [3, 6, 9, 10]
    own = {s: m["train/step_loss"] for s, m in logged.items()}
    assert logged[10]["train/loss"] == own[10]  # an interval of one step
    assert logged[3]["train/loss"] != pytest.approx(own[3])

    # The plot command draws one loss point per evaluation of this real run, against its epochs.
    from ds_trainer.plot import read_curves

    curves = read_curves(run)
    assert curves.eval_steps == [1, 4, 8, 10] and curves.x_label == "Epochs"
    assert curves.val_loss == [evals[s]["val/loss"] for s in (1, 4, 8, 10)]
    assert curves.x == [evals[s]["eval/epoch"] for s in (1, 4, 8, 10)]
