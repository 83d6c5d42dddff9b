"""The step logger: every `log.interval` steps (and at the last), the training scalars and a console line.

The loss logged is the mean over the interval's steps (the books' trainer averages the same way), the
last step's own is `train/step_loss`. It owns its timing. Throughput is measured over the steps of the interval from each step's own wall
time, so evaluation, sampling, saving and rollbacks in between never count as step time; the ETA is the
session's wall time per step so far (those included, as they will recur) times the steps left.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ds_trainer.metrics import Metrics, console_line, memory_scalars

if TYPE_CHECKING:
    from ds_trainer.checkpoint import Progress
    from ds_trainer.flops import Utilisation
    from ds_trainer.step import StepResult


class LogWindow:
    """The steps since the last reading: their mean loss, ms/step and tokens/s over one log interval."""

    def __init__(self) -> None:
        self.steps, self.tokens, self.seconds, self.loss = 0, 0, 0.0, 0.0

    def add(self, tokens: int, seconds: float, loss: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.loss += loss

    def take(self) -> tuple[float, float, float]:
        """(mean loss, seconds per step, tokens per second) of the steps added since the last take; starts
        afresh."""
        out = self.loss / self.steps, self.seconds / self.steps, self.tokens / self.seconds
        self.steps, self.tokens, self.seconds, self.loss = 0, 0, 0.0, 0.0
        return out


class StepLogger:
    def __init__(
        self,
        metrics: Metrics,
        interval: int,
        total_steps: int,
        progress: Progress,
        utilisation: Utilisation | None = None,
        compiled: bool = False,
    ) -> None:
        self.metrics = metrics
        self.utilisation = utilisation
        self.compiled = compiled
        self.interval = interval
        self.total_steps = total_steps
        self.progress = progress
        self.window = LogWindow()
        self.session_start = time.perf_counter()
        self.session_steps = 0

    def is_due(self, step: int) -> bool:
        """Whether `step` (the step about to be taken) is logged: the step asks for a gradient norm then."""
        return step % self.interval == 0 or step == self.total_steps

    def after_step(self, result: StepResult) -> None:
        self.window.add(result.batch.tokens, result.seconds, result.loss)
        self.session_steps += 1
        if self.compiled and self.session_steps == 1:  # each process compiles in its first step
            self.metrics.scalars(result.step, {"perf/compile_step_s": result.seconds})
            self.metrics.print_line(
                f"step {result.step} took {result.seconds:.1f} s with torch.compile's compilation; "
                "the steps after it run the compiled graphs"
            )
        if not self.is_due(result.step):
            return
        loss, step_s, tok_s = self.window.take()
        elapsed = time.perf_counter() - self.session_start
        eta = elapsed / self.session_steps * (self.total_steps - result.step)
        scalars = {
            "train/loss": loss,
            "train/step_loss": result.loss,
            "train/lr": result.lr,
            "train/tokens_seen": float(self.progress.tokens_seen),
            "train/epoch": result.batch.epochs_done,
            "train/global_batch": float(result.batch.global_batch),
            "perf/tokens_per_sec": tok_s,
            "perf/step_ms": step_s * 1000,
            **memory_scalars(),
        }
        mfu = None
        if self.utilisation is not None:
            scalars["perf/tflops_per_device"] = self.utilisation.tflops_per_device(tok_s)
            mfu = self.utilisation.mfu(tok_s)
            if mfu is not None:
                scalars["perf/mfu"] = mfu
        if result.grad_norm is not None:
            scalars["train/grad_norm"] = result.grad_norm
        if result.loss_scale is not None:
            scalars["train/loss_scale"] = result.loss_scale
        self.metrics.scalars(result.step, scalars)
        line = console_line(
            result.step,
            self.total_steps,
            result.batch.epoch,
            loss,
            result.lr,
            step_s * 1000,
            tok_s,
            eta,
            mfu,
        )
        self.metrics.print_line(line)
