"""Trainer.fit without processes: a fake step and fake components show when each acts and what it gets.

The real components decide for themselves (StepLogger.is_due, Checkpointer.maybe_save, ...); here the
fakes record the calls, so these tests pin the loop's order and what it passes on, in milliseconds.
"""

from __future__ import annotations

import math

import pytest

from ds_trainer.checkpoint import Progress
from ds_trainer.metrics import Metrics
from ds_trainer.preemption import REQUEUE_EXIT
from ds_trainer.step import StepBatch, StepResult
from ds_trainer.step_log import LogWindow, StepLogger
from ds_trainer.trainer import Trainer

TOKENS = 64  # per step


class Calls(list):
    """Every call of every fake, in order, as (who, value)."""


class FakeBatches:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def next(self, step: int) -> StepBatch:
        self.calls.append(("batch", step))
        return StepBatch(step, 4, [], 4 * (step - 1), 4 * step, 1, step == 3, step / 3, None, TOKENS)


class FakeStep:
    def __init__(self, calls: Calls, withheld_at: set[int] = frozenset(), seconds: float = 0.5) -> None:
        self.calls, self.withheld_at, self.seconds = calls, withheld_at, seconds

    def __call__(self, batch: StepBatch, grad_norm: bool) -> StepResult:
        self.calls.append(("step", batch.step, grad_norm))
        withheld = "non-finite loss" if batch.step in self.withheld_at else None
        return StepResult(batch, 10.0 - batch.step, 1e-3, 1.0 if grad_norm else None, withheld, self.seconds)


class Recorder:
    """Any after_step / maybe_run / maybe_save / check / beat / stop component."""

    def __init__(self, name: str, calls: Calls, stop_at: int | None = None) -> None:
        self.name, self.calls, self.stop_at = name, calls, stop_at
        self.epoch_ends: list[int] = []

    def after_step(self, result: StepResult) -> None:
        self.calls.append((self.name, result.step))

    def maybe_run(self, step: int, epoch_end: bool) -> None:
        self.calls.append((self.name, step))
        if epoch_end:
            self.epoch_ends.append(step)

    maybe_save = maybe_run

    def check(self, step: int) -> int | None:
        self.calls.append((self.name + ".check", step))
        return REQUEUE_EXIT if step == self.stop_at else None

    def is_due(self, step: int) -> bool:
        return step % 2 == 0

    def beat(self) -> None:
        self.calls.append(("beat", None))

    def stop(self) -> None:
        self.calls.append(("watchdog.stop", None))


class RollingBack(Recorder):
    """Recovery that moves the run back to `to` after the step `at` (as a rollback to a checkpoint does)."""

    def __init__(self, calls: Calls, progress: Progress, at: int, to: int) -> None:
        super().__init__("recovery", calls)
        self.progress, self.at, self.to = progress, at, to

    def after_step(self, result: StepResult) -> None:
        super().after_step(result)
        if result.step == self.at:
            self.progress.step = self.to
            self.at = None


def trainer(
    calls: Calls, total: int = 4, stop_at: int | None = None, step=None, recovery=None, progress=None
):
    progress = progress or Progress()
    return Trainer(
        total_steps=total,
        progress=progress,
        batches=FakeBatches(calls),
        step=step or FakeStep(calls),
        log=Recorder("log", calls),
        recovery=recovery or Recorder("recovery", calls),
        faults=Recorder("faults", calls),
        evaluator=Recorder("eval", calls),
        checkpointer=Recorder("save", calls),
        stop=Recorder("stop", calls, stop_at),
        watchdog=Recorder("watchdog", calls),
    )


def test_one_step_is_a_list_of_calls_in_order():
    calls = Calls()
    assert trainer(calls, total=1).fit() == 0
    assert calls == [
        ("beat", None),
        ("batch", 1),
        ("step", 1, False),
        ("log", 1),
        ("recovery", 1),
        ("stop", 1),
        ("faults", 1),
        ("eval", 1),
        ("save", 1),
        ("stop.check", 1),
        ("watchdog.stop", None),
    ]


def test_every_step_reaches_every_component_and_the_logger_chooses_the_gradient_norm():
    calls, progress = Calls(), Progress()
    assert trainer(calls, total=5, progress=progress).fit() == 0
    assert [c[1:] for c in calls if c[0] == "step"] == [
        (1, False),
        (2, True),
        (3, False),
        (4, True),
        (5, False),
    ]
    for who in ("log", "recovery", "faults", "eval", "save"):
        assert [c[1] for c in calls if c[0] == who] == [1, 2, 3, 4, 5], who
    assert progress.step == 5 and progress.tokens_seen == 5 * TOKENS


def test_an_agreed_stop_ends_the_loop_with_its_code_and_the_watchdog_stops():
    calls = Calls()
    assert trainer(calls, total=10, stop_at=3).fit() == REQUEUE_EXIT
    assert max(c[1] for c in calls if c[0] == "step") == 3
    assert calls[-2:] == [("stop.check", 3), ("watchdog.stop", None)]


def test_after_a_rollback_evaluation_and_saving_see_the_step_rolled_back_to():
    calls, progress = Calls(), Progress()
    t = trainer(calls, total=5, progress=progress, recovery=RollingBack(calls, progress, at=4, to=2))
    assert t.fit() == 0
    assert [c[1] for c in calls if c[0] == "batch"] == [1, 2, 3, 4, 3, 4, 5]
    assert [c[1] for c in calls if c[0] == "eval"] == [1, 2, 3, 2, 3, 4, 5]
    assert [c[1] for c in calls if c[0] == "save"] == [1, 2, 3, 2, 3, 4, 5]


def test_an_epoch_end_reaches_evaluation_and_saving_unless_the_step_was_rolled_back():
    calls, progress = Calls(), Progress()
    t = trainer(calls, total=5, progress=progress)
    t.fit()
    assert t.evaluator.epoch_ends == t.checkpointer.epoch_ends == [3]  # FakeBatches: step 3 ends an epoch
    calls, progress = Calls(), Progress()
    t = trainer(calls, total=5, progress=progress, recovery=RollingBack(calls, progress, at=3, to=2))
    t.fit()
    assert [c[1] for c in calls if c[0] == "batch"] == [1, 2, 3, 3, 4, 5]
    assert t.evaluator.epoch_ends == t.checkpointer.epoch_ends == [3]  # only the retrained step 3's


def test_a_failing_step_still_stops_the_watchdog():
    calls = Calls()

    def broken(batch, grad_norm):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer(calls, step=broken).fit()
    assert calls[-1] == ("watchdog.stop", None)


class Lines(Metrics):
    def __init__(self) -> None:
        super().__init__([], console=False)
        self.lines, self.logged = [], {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.logged[step] = values

    def print_line(self, line: str) -> None:
        self.lines.append(line)


def test_step_logger_logs_its_interval_and_the_last_step_with_the_interval_throughput():
    metrics, progress = Lines(), Progress()
    log = StepLogger(metrics, interval=2, total_steps=5, progress=progress)
    assert [s for s in range(1, 6) if log.is_due(s)] == [2, 4, 5]
    seconds = {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.2, 5: 1.0}
    for s in range(1, 6):
        progress.advance(TOKENS)
        batch = StepBatch(s, 4, [], 0, 0, 1, False, s / 10, None, TOKENS)
        log.after_step(StepResult(batch, 5.0, 1e-3, 0.5 if log.is_due(s) else None, None, seconds[s]))
    assert sorted(metrics.logged) == [2, 4, 5]
    assert metrics.logged[2]["perf/step_ms"] == pytest.approx(200.0)  # (0.1 + 0.3) / 2 steps
    assert metrics.logged[4]["perf/tokens_per_sec"] == pytest.approx(2 * TOKENS / 0.4)
    assert metrics.logged[5]["perf/step_ms"] == pytest.approx(1000.0)
    assert metrics.logged[5]["train/tokens_seen"] == 5 * TOKENS
    assert metrics.logged[4]["train/grad_norm"] == 0.5
    assert "train/loss_scale" not in metrics.logged[4]  # only fp16 has one
    assert [line.split(" |")[0] for line in metrics.lines] == ["step 2/5", "step 4/5", "step 5/5"]


def test_log_window_starts_afresh_after_each_reading():
    w = LogWindow()
    w.add(100, 0.5, 4.0)
    w.add(100, 1.5, 2.0)
    assert w.take() == (3.0, 1.0, 100.0)  # the interval's mean loss, as the books' trainer logs it
    w.add(30, 0.1, 7.0)
    loss, step_s, tok_s = w.take()
    assert loss == 7.0 and step_s == pytest.approx(0.1) and math.isclose(tok_s, 300.0)


def test_step_logger_logs_the_interval_mean_loss_and_the_epoch_the_step_is_in():
    metrics, progress = Lines(), Progress()
    log = StepLogger(metrics, interval=3, total_steps=4, progress=progress)
    step_losses = {1: 6.0, 2: 5.0, 3: 1.0, 4: 2.0}
    for s in range(1, 5):
        progress.advance(TOKENS)
        batch = StepBatch(s, 4, [], 0, 0, 1 if s <= 3 else 2, s == 3, s / 3, None, TOKENS)
        log.after_step(StepResult(batch, step_losses[s], 1e-3, None, None, 0.1))
    assert metrics.logged[3]["train/loss"] == 4.0 and metrics.logged[3]["train/step_loss"] == 1.0
    assert metrics.logged[4]["train/loss"] == 2.0  # the window started afresh after step 3
    assert metrics.logged[3]["train/epoch"] == 1.0
    assert [line.split(" | ")[1] for line in metrics.lines] == ["epoch 1", "epoch 2"]
