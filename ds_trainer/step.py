"""One optimizer step: the batch it trains on, and the strategy that trains on it.

`BatchSource` decides each step's global batch (ramp-up included) and takes its windows from the sampler.
The strategy is chosen once, when the run is built: `DataParallelStep` (plain data parallelism and ZeRO,
with the loss guard, loss faults and ramp-up) or `PipelineStep` (DeepSpeed's pipeline engine, which runs
forward, backward and the update inside one call; the run refuses what it cannot do). Both also run the
model for evaluation and sampling, so callers never ask which one they hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ds_trainer import ds_internals, pipeline
from ds_trainer.collectives import Group
from ds_trainer.model import sample_token
from ds_trainer.tokenizer import EOT_ID

if TYPE_CHECKING:
    from ds_trainer.data import GlobalBatchSampler, WindowSet
    from ds_trainer.ds_config import ResolvedDSConfig
    from ds_trainer.faults import Faults
    from ds_trainer.guard import LossGuard

Windows = list[tuple[int, int]]


@dataclass(frozen=True)
class StepBatch:
    """What one optimizer step trains on, over all ranks."""

    step: int
    """The step this batch makes (1 for the first update)."""
    global_batch: int
    """Windows over all ranks (ramps up when a ramp-up is configured)."""
    micro_batches: list[Windows]
    """This rank's micro-batches, in order."""
    first_sample: int
    """The global sample position before this step (its samples are first_sample .. next_sample - 1)."""
    next_sample: int
    """The global sample position after this step."""
    epoch: int
    """The epoch (from 1) this step's samples belong to; a step that straddles two belongs to the one it ends."""
    ends_epoch: bool
    """Whether this step's samples complete a pass over the training windows."""
    epochs_done: float
    """Passes over the training windows (the first dataset of a mixture) completed after this step, e.g. 1.5."""
    schedule_iteration: float | None
    """With a ramp-up, where the schedule stands after this step, in full-batch steps; else None."""
    tokens: int
    """Tokens trained on in this step, over all ranks."""


@dataclass(frozen=True)
class StepResult:
    """What a step did, for the components that act after it."""

    batch: StepBatch
    loss: float
    """The mean loss over all ranks."""
    lr: float
    """The learning rate this update used."""
    grad_norm: float | None
    """The gradient norm before clipping, when asked for and known."""
    withheld: str | None
    """Why the update was withheld (None: applied)."""
    seconds: float
    """Wall time of the step on this rank."""
    loss_scale: float | None = None
    """fp16's dynamic loss scale after the step."""

    @property
    def step(self) -> int:
        return self.batch.step


class BatchSource:
    """Each step's windows, in the global order the sampler keeps (its position is checkpointed)."""

    def __init__(self, sampler: GlobalBatchSampler, ds: ResolvedDSConfig, context_length: int) -> None:
        self.sampler = sampler
        self.ds = ds
        self.schedule = ds.batch_schedule()
        self.context_length = context_length

    def next(self, step: int) -> StepBatch:
        """The batch of `step` (the step about to be taken), advancing the sampler past it."""
        first, epoch_before = self.sampler.consumed, self.sampler.epoch
        global_batch = self.schedule.global_batch(first)
        micro_per_rank = self.ds.micro_batch_size * self.ds.data_parallel_size
        micro_batches = self.sampler.next_step(global_batch // micro_per_rank)
        iteration = None
        if self.ds.rampup_start_batch is not None:
            # The schedule counts full-batch steps: after this step, samples seen / full batch of them.
            iteration = (first + global_batch) / self.ds.train_batch_size
        return StepBatch(
            step=step,
            global_batch=global_batch,
            micro_batches=micro_batches,
            first_sample=first,
            next_sample=self.sampler.consumed,
            epoch=epoch_before + 1,
            ends_epoch=self.sampler.epoch > epoch_before,
            epochs_done=self.sampler.epochs_done,
            schedule_iteration=iteration,
            tokens=global_batch * self.context_length,
        )


class ModelRunner:
    """What both strategies share: the engine, the data, the device, and the mean over ranks."""

    def __init__(self, engine: Any, ds: ResolvedDSConfig, train_data: WindowSet, group: Group) -> None:
        self.engine = engine
        self.ds = ds
        self.train_data = train_data
        self.group = group
        self.device = group.device
        self.fp16 = ds.fp16

    def _loss_scale(self) -> float | None:
        # `loss_scale` is the property every fp16 optimizer of DeepSpeed has (ZeRO-0's FP16_Optimizer has
        # no `cur_scale`).
        return float(self.engine.optimizer.loss_scale) if self.fp16 else None


class DataParallelStep(ModelRunner):
    """Forward and backward per micro-batch, the guard's verdict, then the update (or none)."""

    def __init__(
        self,
        engine: Any,
        ds: ResolvedDSConfig,
        train_data: WindowSet,
        group: Group,
        guard: LossGuard,
        faults: Faults,
        clip_from_step: int = 0,
    ) -> None:
        super().__init__(engine, ds, train_data, group)
        self.guard = guard
        self.faults = faults
        self.clip_from_step = clip_from_step
        # The object, not its param_groups: loading a checkpoint replaces that list.
        self.optimizer = ds_internals.innermost_optimizer(engine)
        self.max_norm = engine.gradient_clipping()  # the threshold DeepSpeed read from the JSON
        # Stage 0 in fp32 clips with torch and discards the norm, so the step measures it itself.
        self.own_grad_norm = ds.zero_stage == 0 and not (ds.fp16 or ds.bf16)

    def __call__(self, batch: StepBatch, grad_norm: bool) -> StepResult:
        start, lr = time.perf_counter(), self.engine.get_lr()[0]
        if batch.global_batch != self.engine.train_batch_size():  # ramp-up: DeepSpeed changes accumulation
            self.engine.set_train_batch_size(batch.global_batch)
        lr_kwargs = None
        if batch.schedule_iteration is not None:
            lr_kwargs = {"last_batch_iteration": batch.schedule_iteration}
        if self.clip_from_step:  # step k of the books' count (from 0) is our step k + 1
            clipping = self.max_norm if batch.step - 1 >= self.clip_from_step else 0.0
            ds_internals.set_gradient_clipping(self.engine, clipping)
        mean = self._forward_backward(batch, lr_kwargs)
        norm = self._grad_norm() if grad_norm and self.own_grad_norm else None
        withheld = self._update(mean, lr_kwargs, batch)
        self.guard.scale_lr(self.optimizer.param_groups, batch.step + 1)
        if grad_norm and withheld is None and not self.own_grad_norm:
            norm = self.engine.get_global_grad_norm()
        return StepResult(
            batch=batch,
            loss=mean,
            lr=lr,
            grad_norm=None if norm is None or withheld is not None else float(norm),
            withheld=withheld,
            seconds=time.perf_counter() - start,
            loss_scale=self._loss_scale(),
        )

    def _forward_backward(self, batch: StepBatch, lr_kwargs: dict | None) -> float:
        injected = self.faults.loss_factor(batch.step)
        total = torch.zeros((), device=self.device)
        last = len(batch.micro_batches) - 1
        for i, ids in enumerate(batch.micro_batches):
            # DeepSpeed would infer the boundary from its micro-step counter modulo the current accumulation,
            # which falls out of phase once a batch ramp-up changes the accumulation; say it instead.
            self.engine.set_gradient_accumulation_boundary(i == last)
            x, y = (t.to(self.device, non_blocking=True) for t in self.train_data.batch(ids))
            loss = self.engine(x, y)
            if injected != 1.0:
                loss = loss * injected
            self.engine.backward(loss)
            total += loss.detach().float()
            if i < last:
                self.engine.step(lr_kwargs=lr_kwargs)
        return self.group.mean(total / len(batch.micro_batches))

    def _update(self, mean: float, lr_kwargs: dict | None, batch: StepBatch) -> str | None:
        """The optimizer step at the accumulation boundary, or the same bookkeeping without the update."""
        withheld = self.guard.judge(mean)
        skipped_before = self.engine.skipped_steps
        if withheld is None:
            self.engine.step(lr_kwargs=lr_kwargs)
            if self.engine.skipped_steps > skipped_before:  # ZeRO 1-2 refuse a non-finite gradient norm
                withheld = "non-finite gradient norm"
        else:
            with ds_internals.updates_withheld(self.engine):
                self.engine.step(lr_kwargs=lr_kwargs)
        if withheld is not None and self.engine.lr_scheduler is not None:
            # A skipped update still consumes its step: keep the schedule where the step count says.
            iteration = batch.schedule_iteration if batch.schedule_iteration is not None else batch.step
            self.engine.lr_scheduler.step(iteration)
        return withheld

    def _grad_norm(self) -> float:
        # Called after DeepSpeed's all-reduce at the boundary, so every rank holds the full averaged gradient.
        sq = sum(
            p.grad.detach().float().pow(2).sum()
            for p in self.engine.module.parameters()
            if p.grad is not None
        )
        return float(torch.as_tensor(sq).sqrt())

    @torch.no_grad()
    def eval_loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            total += self.engine(x.to(self.device), y.to(self.device)).float()
        return self.group.mean(total / len(batches))

    @torch.no_grad()
    def generate(
        self, prompt: list[int], tokens: int, temperature: float, top_k: int | None, gen: torch.Generator
    ) -> list[int]:
        ids = torch.tensor([prompt], device=self.device)
        return self.engine.module.generate(ids, tokens, temperature, top_k, gen)[0].tolist()


class PipelineStep(ModelRunner):
    """DeepSpeed's 1F1B schedule over the stages; the update happens inside `train_batch`."""

    def __call__(self, batch: StepBatch, grad_norm: bool) -> StepResult:
        start, lr = time.perf_counter(), self.engine.get_lr()[0]
        loss = pipeline.train_step(self.engine, [self.train_data.batch(ids) for ids in batch.micro_batches])
        norm = self.engine.get_global_grad_norm() if grad_norm else None
        return StepResult(
            batch=batch,
            loss=self.group.mean(loss),
            lr=lr,
            grad_norm=None if norm is None else float(norm),
            withheld=None,
            seconds=time.perf_counter() - start,
            loss_scale=self._loss_scale(),
        )

    @torch.no_grad()
    def eval_loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        return float(pipeline.eval_loss(self.engine, batches))

    @torch.no_grad()
    def generate(
        self, prompt: list[int], tokens: int, temperature: float, top_k: int | None, gen: torch.Generator
    ) -> list[int]:
        return pipeline.generate(
            self.engine,
            prompt,
            tokens,
            self.train_data.context_length,
            self.ds.micro_batch_size,
            lambda row: sample_token(row, temperature, top_k, gen),
            pad_id=EOT_ID,
        )


def build_step(
    engine: Any,
    ds: ResolvedDSConfig,
    train_data: WindowSet,
    group: Group,
    guard: LossGuard,
    faults: Faults,
    clip_from_step: int = 0,
) -> DataParallelStep | PipelineStep:
    """The strategy for this engine, chosen once (the run config refuses clip_from_step with a pipeline)."""
    if ds_internals.is_pipeline_engine(engine):
        return PipelineStep(engine, ds, train_data, group)
    return DataParallelStep(engine, ds, train_data, group, guard, faults, clip_from_step)
