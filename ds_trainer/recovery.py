"""What happens after a withheld update: the incident is recorded, and after `guard.rollback_after` in a
row the run goes back to its newest good checkpoint, past the data that led here, at a reduced rate.

The guard judges; this object acts. A rollback keeps the sample position (the data since the checkpoint
is skipped, not replayed) and the guard's counters (they describe the run, not the checkpoint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ds_trainer import ds_internals
from ds_trainer.errors import DsTrainerError

if TYPE_CHECKING:
    from ds_trainer.checkpoint import Checkpointer, Progress
    from ds_trainer.data import GlobalBatchSampler
    from ds_trainer.guard import IncidentLog, LossGuard
    from ds_trainer.metrics import Metrics
    from ds_trainer.step import StepResult


class Recovery:
    def __init__(
        self,
        engine: Any,
        guard: LossGuard,
        checkpointer: Checkpointer,
        sampler: GlobalBatchSampler,
        progress: Progress,
        incidents: IncidentLog,
        metrics: Metrics,
    ) -> None:
        self.engine = engine
        self.guard = guard
        self.checkpointer = checkpointer
        self.sampler = sampler
        self.progress = progress
        self.incidents = incidents
        self.metrics = metrics

    def after_step(self, result: StepResult) -> None:
        if result.withheld is None:
            return
        self._record(result)
        if self.guard.wants_rollback():
            self.roll_back()

    def _record(self, result: StepResult) -> None:
        g, step = self.guard, result.step
        samples = [result.batch.first_sample, result.batch.next_sample]
        counts = {"incidents/withheld_steps": float(g.withheld), "incidents/rollbacks": float(g.rollbacks)}
        self.metrics.scalars(step, counts)
        action = "update withheld"
        self.metrics.print_line(
            f"incident at step {step}: {result.withheld}; {action} (samples {samples[0]}-{samples[1] - 1})"
        )
        self.incidents.write(
            step=step, loss=result.loss, reason=result.withheld, action=action, samples=samples
        )

    def roll_back(self) -> None:
        """Collective: back to the newest good checkpoint, past the data since, at a reduced learning rate."""
        g, failed_at = self.guard, self.progress.step
        position, counters = self.sampler.state_dict(), g.state_dict()
        if not self.checkpointer.roll_back():
            raise DsTrainerError(
                f"{g.consecutive} consecutive steps withheld at step {failed_at} and no checkpoint to roll back "
                "to; lower checkpoint.save_interval or raise guard.rollback_after"
            )
        self.sampler.load_state_dict(position)  # skip the window since the checkpoint
        step = self.progress.step
        g.rolled_back(counters, step)
        g.scale_lr(ds_internals.innermost_optimizer(self.engine).param_groups, step + 1)
        action = (
            f"rolled back to step {step}, skipping the data since; learning rate x{g.settings.lr_factor:g} "
            f"until step {g.lr_cut_until}"
        )
        self.metrics.print_line(
            f"incident at step {failed_at}: {g.settings.rollback_after} steps withheld in a row; {action}"
        )
        self.incidents.write(step=failed_at, reason="consecutive withheld steps", action=action)
