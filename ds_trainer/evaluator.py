"""Evaluation and sampling: after the first update, every `eval.interval` steps and at the last step.

As the from-scratch books evaluate: the model in eval mode, the training loss and the validation loss,
each the mean over `eval.iters` micro-batches per rank of fixed windows (the first of each split, the
same every time), so evaluations are comparable along the run. The sample continues
`eval.sample_prompt` with a generator seeded by the run's seed and the step: every rank draws the same
tokens (ZeRO-3 gathers weights collectively, so every rank must generate). It comes with each
evaluation, or with `eval.sample_every_epoch` at the end of each epoch instead, as the books' loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ds_trainer.tokenizer import decode, get_encoding

if TYPE_CHECKING:
    from ds_trainer.config import EvalSection
    from ds_trainer.data import WindowSet
    from ds_trainer.metrics import Metrics
    from ds_trainer.step import DataParallelStep, PipelineStep
    from ds_trainer.watchdog import Watchdog

PERPLEXITY_CAP = 50.0
"""Losses above this are reported as exp(50): beyond it perplexity says nothing but 'untrained'."""


class Evaluator:
    def __init__(
        self,
        runner: DataParallelStep | PipelineStep,
        data: tuple[WindowSet, WindowSet | None],
        settings: EvalSection,
        seed: int,
        total_steps: int,
        dp: tuple[int, int],
        position: Callable[[], dict[str, float]],
        metrics: Metrics,
        watchdog: Watchdog,
    ) -> None:
        self.runner = runner
        self.train_data, self.val_data = data
        self.settings = settings
        self.seed = seed
        self.total_steps = total_steps
        self.dp_rank, self.dp_size = dp
        self.position = position
        self.metrics = metrics
        self.watchdog = watchdog

    def is_due(self, step: int) -> bool:
        every = self.settings.interval
        due = step == 1 or step % every == 0 or step == self.total_steps if every > 0 else False
        return self.val_data is not None and due

    def maybe_run(self, step: int, epoch_end: bool) -> None:
        sampling = bool(self.settings.sample_prompt and self.settings.sample_tokens)
        if self.is_due(step):
            self.watchdog.beat()
            self.report_losses(step)
            if sampling and not self.settings.sample_every_epoch:
                self.report_sample(step)
        if sampling and self.settings.sample_every_epoch and epoch_end:
            self.watchdog.beat()
            self.report_sample(step)

    def report_losses(self, step: int) -> None:
        assert self.val_data is not None
        train_loss, val_loss = self.mean_loss(self.train_data), self.mean_loss(self.val_data)
        ppl = math.exp(min(val_loss, PERPLEXITY_CAP))
        scalars = {"eval/train_loss": train_loss, "val/loss": val_loss, "val/perplexity": ppl}
        self.metrics.scalars(step, {**scalars, **self.position()})
        self.metrics.print_line(
            f"eval step {step} | train loss {train_loss:.3f} | val loss {val_loss:.3f} | perplexity {ppl:,.1f}"
        )

    def report_sample(self, step: int) -> None:
        text = self.sample(step)
        self.metrics.text(step, "samples/text", text)
        self.metrics.print_line(f"sample step {step} | {text!r}")

    def mean_loss(self, data: WindowSet) -> float:
        """Mean loss in eval mode over eval.iters micro-batches per rank of `data`'s first windows (each
        data-parallel rank its own)."""
        mb = self.runner.ds.micro_batch_size
        batches = [
            data.batch(data.eval_ids((it * self.dp_size + self.dp_rank) * mb, mb))
            for it in range(self.settings.iters)
        ]
        engine = self.runner.engine
        engine.eval()
        try:
            return self.runner.eval_loss(batches)
        finally:
            engine.train()

    def sample(self, step: int) -> str:
        prompt = get_encoding().encode_ordinary(self.settings.sample_prompt)
        gen = torch.Generator(device=self.runner.device).manual_seed(self.seed + step)
        engine = self.runner.engine
        engine.eval()
        try:
            out = self.runner.generate(
                prompt,
                self.settings.sample_tokens,
                self.settings.temperature,
                self.settings.top_k or None,
                gen,
            )
        finally:
            engine.train()
        return decode(out)
