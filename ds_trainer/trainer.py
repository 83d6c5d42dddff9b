"""The training loop: a list of calls. Each component decides for itself when it acts.

Everything the loop calls is built before it (ds_trainer.pretrain); the loop only passes on what a
step did. A component that needs the step's outcome takes the `StepResult`; one that acts at a step
boundary takes the step number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ds_trainer.checkpoint import Checkpointer, Progress
    from ds_trainer.evaluator import Evaluator
    from ds_trainer.faults import Faults
    from ds_trainer.preemption import Stopper
    from ds_trainer.recovery import Recovery
    from ds_trainer.step import StepBatch, StepResult
    from ds_trainer.step_log import StepLogger
    from ds_trainer.watchdog import Watchdog


class Step(Protocol):
    def __call__(self, batch: StepBatch, grad_norm: bool) -> StepResult: ...


class Batches(Protocol):
    def next(self, step: int) -> StepBatch: ...


class Trainer:
    def __init__(
        self,
        total_steps: int,
        progress: Progress,
        batches: Batches,
        step: Step,
        log: StepLogger,
        recovery: Recovery,
        faults: Faults,
        evaluator: Evaluator,
        checkpointer: Checkpointer,
        stop: Stopper,
        watchdog: Watchdog,
    ) -> None:
        self.total_steps = total_steps
        self.progress = progress
        self.batches = batches
        self.step = step
        self.log = log
        self.recovery = recovery
        self.faults = faults
        self.evaluator = evaluator
        self.checkpointer = checkpointer
        self.stop = stop
        self.watchdog = watchdog

    def fit(self) -> int:
        """Train to the end (returns 0) or until a stop is agreed (saved; returns REQUEUE_EXIT)."""
        try:
            while self.progress.step < self.total_steps:
                self.watchdog.beat()
                batch = self.batches.next(self.progress.step + 1)
                result = self.step(batch, grad_norm=self.log.is_due(batch.step))
                self.progress.advance(batch.tokens)
                for component in (self.log, self.recovery, self.stop, self.faults):
                    component.after_step(result)
                step = self.progress.step  # a rollback moves it back
                epoch_end = result.batch.ends_epoch and step == result.step
                self.evaluator.maybe_run(step, epoch_end)
                self.checkpointer.maybe_save(step, epoch_end)
                if (code := self.stop.check(step)) is not None:
                    return code
            return 0
        finally:
            self.watchdog.stop()
