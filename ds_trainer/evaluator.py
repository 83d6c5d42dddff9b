"""Evaluation and sampling every `eval.interval` steps and at the last step.

The validation loss is the mean over `eval.iters` micro-batches per rank, the same windows every time,
so evaluations are comparable along the run. The sample continues `eval.sample_prompt` with a generator
seeded by the run's seed and the step: every rank draws the same tokens (ZeRO-3 gathers weights
collectively, so every rank must generate).
"""

from __future__ import annotations

import math
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
        val_data: WindowSet | None,
        settings: EvalSection,
        seed: int,
        total_steps: int,
        dp_rank: int,
        dp_size: int,
        metrics: Metrics,
        watchdog: Watchdog,
    ) -> None:
        self.runner = runner
        self.val_data = val_data
        self.settings = settings
        self.seed = seed
        self.total_steps = total_steps
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.metrics = metrics
        self.watchdog = watchdog

    def is_due(self, step: int) -> bool:
        every = self.settings.interval
        return self.val_data is not None and every > 0 and (step % every == 0 or step == self.total_steps)

    def maybe_run(self, step: int) -> None:
        if not self.is_due(step):
            return
        self.watchdog.beat()
        val_loss = self.evaluate()
        ppl = math.exp(min(val_loss, PERPLEXITY_CAP))
        self.metrics.scalars(step, {"val/loss": val_loss, "val/perplexity": ppl})
        self.metrics.print_line(f"eval step {step} | val loss {val_loss:.3f} | perplexity {ppl:,.1f}")
        if self.settings.sample_prompt and self.settings.sample_tokens:
            text = self.sample(step)
            self.metrics.text(step, "samples/text", text)
            self.metrics.print_line(f"sample step {step} | {text!r}")

    def evaluate(self) -> float:
        """Mean validation loss over eval.iters micro-batches per rank (each data-parallel rank its own windows)."""
        assert self.val_data is not None
        mb = self.runner.ds.micro_batch_size
        batches = [
            self.val_data.batch(self.val_data.eval_ids((it * self.dp_size + self.dp_rank) * mb, mb))
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
