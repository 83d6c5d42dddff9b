"""The training loop: step, evaluate and sample, log, save. Everything it uses is built elsewhere."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.engine import PipelineEngine

from ds_trainer import pipeline
from ds_trainer.checkpoint import Checkpointer, Progress
from ds_trainer.data import GlobalBatchSampler, WindowSet
from ds_trainer.ds_config import ResolvedDSConfig
from ds_trainer.engine import replay_cpu_adam_bias_correction
from ds_trainer.errors import DsTrainerError
from ds_trainer.faults import Faults
from ds_trainer.guard import IncidentLog, LossGuard, innermost_optimizer, updates_withheld
from ds_trainer.metrics import Metrics, ThroughputWindow, console_line, memory_scalars
from ds_trainer.preemption import REQUEUE_EXIT, StopRequest
from ds_trainer.tokenizer import EOT_ID, decode, get_encoding
from ds_trainer.watchdog import Watchdog


@dataclass(frozen=True)
class LoopSettings:
    """The loop's knobs, taken from the run config by the caller."""

    total_steps: int
    log_interval: int
    eval_interval: int
    eval_iters: int
    save_interval: int
    seed: int
    sample_prompt: str
    sample_tokens: int
    temperature: float
    top_k: int


class Trainer:
    def __init__(
        self,
        engine: Any,
        ds: ResolvedDSConfig,
        train_data: WindowSet,
        val_data: WindowSet | None,
        sampler: GlobalBatchSampler,
        progress: Progress,
        checkpointer: Checkpointer,
        metrics: Metrics,
        settings: LoopSettings,
        stop: StopRequest,
        watchdog: Watchdog,
        guard: LossGuard,
        incidents: IncidentLog,
        faults: Faults | None = None,
    ) -> None:
        self.engine = engine
        self.ds = ds
        self.train_data = train_data
        self.val_data = val_data
        self.sampler = sampler
        self.progress = progress
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.s = settings
        self.stop = stop
        self.watchdog = watchdog
        self.guard = guard
        self.incidents = incidents
        self.faults = faults
        self.device = torch.device(get_accelerator().current_device_name())
        self.batch_schedule = ds.batch_schedule()
        self.is_pipeline = isinstance(engine, PipelineEngine)
        # Stage 0 in fp32 clips with torch and discards the norm, so the trainer measures it itself
        # (not across pipeline stages, which each hold part of the gradient: there the norm is not logged).
        self._own_grad_norm = ds.zero_stage == 0 and not (ds.fp16 or ds.bf16) and not self.is_pipeline

    def fit(self) -> int:
        """Train to the end (returns 0) or until a stop is agreed (saves, returns REQUEUE_EXIT)."""
        try:
            return self._loop()
        finally:
            self.watchdog.stop()

    def _loop(self) -> int:
        s, p = self.s, self.progress
        window = ThroughputWindow()
        session_start, session_steps = time.perf_counter(), 0
        self.stop.install()
        while p.step < s.total_steps:
            self.watchdog.beat()
            step_start = time.perf_counter()
            is_log = (p.step + 1) % s.log_interval == 0 or p.step + 1 == s.total_steps
            lr = self.engine.get_lr()[0]
            global_batch = self.batch_schedule.global_batch(self.sampler.consumed)
            consumed_before = self.sampler.consumed
            loss, grad_norm, withheld = self.train_step(global_batch, want_grad_norm=is_log)
            p.step += 1
            p.tokens_seen += global_batch * self.train_data.context_length
            window.add(global_batch * self.train_data.context_length)
            session_steps += 1
            if is_log:
                get_accelerator().synchronize()
                step_s, tok_s = window.rates()
                eta = (time.perf_counter() - session_start) / session_steps * (s.total_steps - p.step)
                self._log_step(loss, lr, grad_norm, step_s, tok_s, global_batch, eta)
                window.reset()
            if withheld is not None:
                self._incident(withheld, loss, consumed_before, "update withheld")
                if self.guard.wants_rollback():
                    self._rollback()
                    window.reset()
            self.stop.note_step(time.perf_counter() - step_start)
            if self.faults is not None:
                self.faults.after_step(p.step)
            is_eval = s.eval_interval and (p.step % s.eval_interval == 0 or p.step == s.total_steps)
            if self.val_data is not None and is_eval:
                self.watchdog.beat()
                self._evaluate_and_sample()
                window.reset()  # evaluation time is not step time
            saved = False
            if (s.save_interval and p.step % s.save_interval == 0) or p.step == s.total_steps:
                self._save()
                saved = True
                window.reset()
            reason = self.stop.agreed(self.device, self.checkpointer.last_save_seconds)
            if reason is not None and p.step < s.total_steps:
                if not saved:
                    self._save()
                self.metrics.print(
                    f"stopping at step {p.step}: {reason}; checkpoint saved, exit {REQUEUE_EXIT}"
                )
                return REQUEUE_EXIT
        return 0

    def _incident(self, why: str, loss: float, first_sample: int, action: str) -> None:
        p, g = self.progress, self.guard
        samples = [first_sample, self.sampler.consumed]
        self.metrics.scalars(
            p.step, {"incidents/withheld_steps": float(g.withheld), "incidents/rollbacks": float(g.rollbacks)}
        )
        self.metrics.print(
            f"incident at step {p.step}: {why}; {action} (samples {samples[0]}-{samples[1] - 1})"
        )
        self.incidents.write(step=p.step, loss=loss, reason=why, action=action, samples=samples)

    def _rollback(self) -> None:
        """Back to the newest good checkpoint, past the data that led here, at a reduced learning rate."""
        p, g = self.progress, self.guard
        position, failed_at = self.sampler.state_dict(), p.step
        plan = self.checkpointer.plan_resume(self.checkpointer.configs["meta"]["layout"])
        if plan is None:
            raise DsTrainerError(
                f"{g.consecutive} consecutive steps withheld at step {p.step} and no checkpoint to roll back "
                "to; lower checkpoint.save_interval or raise guard.rollback_after"
            )
        counters = g.state_dict()
        self.checkpointer.load(self.engine, plan)
        replay_cpu_adam_bias_correction(self.engine)
        self.sampler.load_state_dict(position)  # skip the window since the checkpoint
        g.load_state_dict({**counters, "consecutive": 0, "rollbacks": counters["rollbacks"] + 1})
        g.lr_cut_until = p.step + g.s.lr_steps
        self._apply_lr_scale(p.step)
        action = (
            f"rolled back to step {p.step}, skipping the data since; learning rate x{g.s.lr_factor:g} "
            f"until step {g.lr_cut_until}"
        )
        self.metrics.print(
            f"incident at step {failed_at}: {g.s.rollback_after} steps withheld in a row; {action}"
        )
        self.incidents.write(step=failed_at, reason="consecutive withheld steps", action=action)

    def _save(self) -> None:
        self.watchdog.beat()
        path = self.checkpointer.save(self.engine, self.progress.step)
        seconds = self.checkpointer.last_save_seconds
        self.metrics.scalars(self.progress.step, {"perf/checkpoint_save_s": seconds})
        self.metrics.print(f"saved {path} in {seconds:.1f} s")

    def train_step(self, global_batch: int, want_grad_norm: bool) -> tuple[float, float | None, str | None]:
        """One optimizer step of `global_batch` windows over all ranks.

        Returns the mean loss over all ranks, the gradient norm before clipping if asked, and why the
        update was withheld (None when it was applied).
        """
        micro_per_rank = self.ds.micro_batch_size * self.ds.data_parallel_size
        if global_batch != self.engine.train_batch_size():  # batch ramp-up: DeepSpeed changes accumulation
            self.engine.set_train_batch_size(global_batch)
        lr_kwargs = None
        if self.ds.rampup_start_batch is not None:
            # The schedule counts full-batch steps: after this step, samples seen / full batch of them.
            lr_kwargs = {
                "last_batch_iteration": (self.sampler.consumed + global_batch) / self.ds.train_batch_size
            }
        micro_batches = self.sampler.next_step(global_batch // micro_per_rank)
        if self.is_pipeline:
            loss = pipeline.train_step(self.engine, [self.train_data.batch(ids) for ids in micro_batches])
            norm = self.engine.get_global_grad_norm() if want_grad_norm else None
            return self._global_mean(loss), None if norm is None else float(norm), None
        injected = self.faults.loss_factor(self.progress.step + 1) if self.faults is not None else 1.0
        total = torch.zeros((), device=self.device)
        manual_norm = None
        for i, ids in enumerate(micro_batches):
            # DeepSpeed would infer the boundary from its micro-step counter modulo the current accumulation,
            # which falls out of phase once a batch ramp-up changes the accumulation; say it instead.
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            x, y = (t.to(self.device, non_blocking=True) for t in self.train_data.batch(ids))
            loss = self.engine(x, y)
            if injected != 1.0:
                loss = loss * injected
            self.engine.backward(loss)
            total += loss.detach().float()
            if i < len(micro_batches) - 1:
                self.engine.step(lr_kwargs=lr_kwargs)
        if want_grad_norm and self._own_grad_norm:
            manual_norm = self._grad_norm()
        mean = self.guard.global_mean(total / len(micro_batches))
        withheld = self.guard.judge(mean)
        skipped_before = self.engine.skipped_steps
        if withheld is None:
            self.engine.step(lr_kwargs=lr_kwargs)
            if self.engine.skipped_steps > skipped_before:  # ZeRO 1-2 refuse a non-finite gradient norm
                withheld = "non-finite gradient norm"
        else:
            with updates_withheld(self.engine):
                self.engine.step(lr_kwargs=lr_kwargs)
        if withheld is not None and self.engine.lr_scheduler is not None:
            # A skipped update still consumes its step: keep the schedule where the step count says.
            iteration = lr_kwargs["last_batch_iteration"] if lr_kwargs else self.progress.step + 1
            self.engine.lr_scheduler.step(iteration)
        self._apply_lr_scale(self.progress.step + 1)
        if not want_grad_norm or withheld is not None:
            return mean, None, withheld
        norm = manual_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        return mean, None if norm is None else float(norm), withheld

    def _apply_lr_scale(self, next_step: int) -> None:
        """After a rollback, the scheduler's rate times the guard's factor, for the next update."""
        scale = self.guard.lr_scale(next_step + 1)
        if scale != 1.0:
            for group in innermost_optimizer(self.engine).param_groups:
                group["lr"] *= scale

    def _grad_norm(self) -> float:
        # Called after DeepSpeed's all-reduce at the boundary, so every rank holds the full averaged gradient.
        sq = sum(
            p.grad.detach().float().pow(2).sum()
            for p in self.engine.module.parameters()
            if p.grad is not None
        )
        return float(torch.as_tensor(sq).sqrt())

    def _global_mean(self, value: torch.Tensor) -> float:
        t = value.detach().float().clone()
        dist.all_reduce(t)
        return float(t) / dist.get_world_size()

    def _log_step(
        self,
        loss: float,
        lr: float,
        grad_norm: float | None,
        step_s: float,
        tok_s: float,
        batch: int,
        eta_s: float,
    ) -> None:
        p = self.progress
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/tokens_seen": float(p.tokens_seen),
            "train/global_batch": float(batch),
            "perf/tokens_per_sec": tok_s,
            "perf/step_ms": step_s * 1000,
            **memory_scalars(),
        }
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        if self.ds.fp16:
            # `loss_scale` is the property every fp16 optimizer of DeepSpeed has (ZeRO-0's FP16_Optimizer
            # has no `cur_scale`).
            scalars["train/loss_scale"] = float(self.engine.optimizer.loss_scale)
        self.metrics.scalars(p.step, scalars)
        self.metrics.print(
            console_line(
                p.step, self.s.total_steps, self.sampler.epoch + 1, loss, lr, step_s * 1000, tok_s, eta_s
            )
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over eval_iters micro-batches per rank, the same windows every time."""
        assert self.val_data is not None
        self.engine.eval()
        mb, rank, world = self.ds.micro_batch_size, self.sampler.rank, self.sampler.world_size
        batches = [
            self.val_data.batch(self.val_data.eval_ids((it * world + rank) * mb, mb))
            for it in range(self.s.eval_iters)
        ]
        if self.is_pipeline:
            loss = pipeline.eval_loss(self.engine, batches)
            self.engine.train()
            return float(loss)
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            total += self.engine(x, y).float()
        self.engine.train()
        return self._global_mean(total / self.s.eval_iters)

    @torch.no_grad()
    def sample(self) -> str:
        """Continue the prompt. Every rank generates (ZeRO-3 gathers weights collectively) with the same seed."""
        prompt = get_encoding().encode_ordinary(self.s.sample_prompt)
        self.engine.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.s.seed + self.progress.step)
        if self.is_pipeline:
            out = pipeline.generate(
                self.engine,
                prompt,
                self.s.sample_tokens,
                self.train_data.context_length,
                self.ds.micro_batch_size,
                self.s.temperature,
                self.s.top_k or None,
                gen,
                pad_id=EOT_ID,
            )
            self.engine.train()
            return decode(out)
        ids = torch.tensor([prompt], device=self.device)
        out = self.engine.module.generate(
            ids, self.s.sample_tokens, self.s.temperature, self.s.top_k or None, gen
        )
        self.engine.train()
        return decode(out[0].tolist())

    def _evaluate_and_sample(self) -> None:
        step = self.progress.step
        val_loss = self.evaluate()
        ppl = math.exp(min(val_loss, 50.0))
        self.metrics.scalars(step, {"val/loss": val_loss, "val/perplexity": ppl})
        self.metrics.print(f"eval step {step} | val loss {val_loss:.3f} | perplexity {ppl:,.1f}")
        if self.s.sample_prompt and self.s.sample_tokens:
            text = self.sample()
            self.metrics.text(step, "samples/text", text)
            self.metrics.print(f"sample step {step} | {text!r}")
