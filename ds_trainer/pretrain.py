"""Assembly: from a run config and a DeepSpeed JSON to a running Trainer."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_trainer import __version__
from ds_trainer.checkpoint import MODEL_FIELDS, Checkpointer, Progress
from ds_trainer.config import RunConfig
from ds_trainer.data import GlobalBatchSampler, SampleStream, build_datasets
from ds_trainer.ds_config import ResolvedDSConfig, launcher_world_size, load_ds_json, resolve, schedule_lr
from ds_trainer.ds_validate import folder_problems
from ds_trainer.engine import (
    accelerator_name,
    build_engine,
    build_model,
    data_parallel_coords,
    init_distributed,
    leave_distributed,
    replay_cpu_adam_bias_correction,
)
from ds_trainer.errors import DsTrainerError
from ds_trainer.faults import Faults
from ds_trainer.guard import GuardSettings, IncidentLog, LossGuard
from ds_trainer.metrics import Metrics
from ds_trainer.model import GPT, GPTConfig
from ds_trainer.pipeline import parse_partition
from ds_trainer.preemption import StopRequest
from ds_trainer.tokenizer import identity
from ds_trainer.trainer import LoopSettings, Trainer
from ds_trainer.watchdog import Watchdog


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_configs(run: RunConfig, ds: ResolvedDSConfig, gpt_config: GPTConfig, world: int) -> dict[str, Any]:
    """Saved beside every checkpoint: what resume compares and what a person reads to know the run."""
    dp = world // ds.pipeline_stages
    return {
        "run_config": run.to_dict(),
        "ds_config": {k: v for k, v in ds.config.items() if k != "checkpoint"},
        "meta": {
            "ds_trainer": __version__,
            "git_commit": git_commit(),
            "versions": package_versions(),
            "world_size": world,
            "layout": {
                "zero_stage": ds.zero_stage,
                "data_parallel": dp,
                "pipeline_stages": ds.pipeline_stages,
            },
            "identity": {
                "model": {k: getattr(gpt_config, k) for k in MODEL_FIELDS},
                "tokenizer": identity(),
                "context_length": run.context_length,
                "stride": run.stride,
                "data_sources": run.data_sources(),
                "val_fraction": run.data.val_fraction,
                "seed": run.train.seed,
                "pipeline_stages": ds.pipeline_stages,
            },
        },
    }


def git_commit() -> str | None:
    """The project's commit when it runs from a git checkout; None for an installed copy."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    import deepspeed
    import tiktoken

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "tiktoken": tiktoken.__version__,
        "numpy": np.__version__,
    }


def pretrain(run: RunConfig, ds_config_path: str | None) -> int:
    """Train; returns the process exit code (0 finished, REQUEUE_EXIT stopped early with a checkpoint)."""
    # Every check that reads only files and the environment runs before the process group exists,
    # so a bad input stops every rank with the same message instead of leaving peers waiting; the
    # JSON, the data, their fit and the run's folders are all checked before the problems are
    # reported together.
    gpt_config = run.gpt_config()
    world = launcher_world_size()
    problems: list[str] = []
    raw = source = None
    n_train = None
    try:
        raw, source = load_ds_json(ds_config_path)
    except DsTrainerError as e:
        problems.append(str(e))
    try:
        train_data, val_data, weights = build_datasets(
            run.data_sources(), run.context_length, run.stride, run.data.val_fraction, gpt_config.vocab_size
        )
        n_train = sum(train_data.sizes())
    except DsTrainerError as e:
        problems.append(str(e))
    if raw is not None:
        try:
            ds = resolve(raw, source, run, world, n_train, accelerator_name())
        except DsTrainerError as e:
            problems.append(str(e))
    if run.pipeline.stages > 1:
        try:
            parse_partition(run.pipeline.partition, gpt_config.n_layer, run.pipeline.stages)
        except DsTrainerError as e:
            problems.append(str(e))
    problems += folder_problems(run, int(os.environ.get("RANK", "0")))
    if problems:
        raise DsTrainerError("; ".join(problems))

    init_distributed()
    rank = int(os.environ["RANK"])
    metrics = Metrics.for_rank(rank, run.tensorboard_dir, run.jsonl_path)
    faults = Faults.from_env(rank, run.run_dir)
    c = run.checkpoint
    checkpointer = Checkpointer(
        run.run_dir,
        rank,
        world,
        {},
        run_configs(run, ds, gpt_config, world),
        verify_mode=c.verify,
        keep_last=c.keep_last,
        keep_every=c.keep_every,
        faults=faults,
    )
    plan = None
    if c.resume:
        layout = checkpointer.configs["meta"]["layout"]
        plan = checkpointer.plan_resume(layout)
    if plan is not None:
        for why in plan.skipped:
            metrics.print(f"passed over checkpoint {why}")
        if plan.saved["meta"]["layout"] != checkpointer.configs["meta"]["layout"]:
            before = ds.train_batch_size
            ds = resolve(raw, source, run, world, n_train, accelerator_name(), global_batch=plan.global_batch)
            if ds.train_batch_size != before:
                plan.accepted.append(
                    f"gradient_accumulation_steps → {ds.gradient_accumulation_steps} to keep the checkpoint's "
                    f"global batch of {ds.train_batch_size}"
                )
        if plan.universal:
            ds.config["checkpoint"] = {**ds.config.get("checkpoint", {}), "load_universal": True}
            old, new = plan.saved["meta"]["layout"], checkpointer.configs["meta"]["layout"]
            metrics.print(
                f"layout changed (ZeRO-{old['zero_stage']} x {old['data_parallel']} ranks → "
                f"ZeRO-{new['zero_stage']} x {new['data_parallel']}): converting through DeepSpeed's universal checkpoint"
            )
        checkpointer.configs = run_configs(run, ds, gpt_config, world)
        checkpointer.prepare(plan, ds.zero_stage)

    seed_everything(run.train.seed)  # the same initial weights on every rank
    model = build_model(gpt_config, ds, run.pipeline.partition)
    engine = build_engine(model, ds)
    seed_everything(run.train.seed + 1 + rank)  # different dropout draws per rank

    dp_rank, dp_size = data_parallel_coords(engine)
    stream = SampleStream(train_data.sizes(), weights, run.train.seed)
    sampler = GlobalBatchSampler(stream, ds.micro_batch_size, dp_rank, dp_size)
    progress = Progress()
    g = run.guard
    guard = LossGuard(
        GuardSettings(g.spike_factor, g.spike_window, g.rollback_after, g.lr_factor, g.lr_steps), world
    )
    checkpointer.shared = {"progress": progress, "sampler": sampler, "guard": guard}
    if plan is not None:
        checkpointer.load(engine, plan)
        replay_cpu_adam_bias_correction(engine)
        if lr_note := check_resumed_lr(engine, ds, progress.step, sampler.consumed):
            plan.accepted.append(lr_note)
        metrics.print(f"resumed from {run.run_dir / plan.step_tag} at step {progress.step}")
        for change in plan.accepted:
            metrics.print(f"changed since the checkpoint (accepted): {change}")
    settings = LoopSettings(
        total_steps=ds.total_steps,
        log_interval=run.log.interval,
        eval_interval=run.eval.interval,
        eval_iters=run.eval.iters,
        save_interval=run.checkpoint.save_interval,
        seed=run.train.seed,
        sample_prompt=run.eval.sample_prompt,
        sample_tokens=run.eval.sample_tokens,
        temperature=run.eval.temperature,
        top_k=run.eval.top_k,
    )
    with torch.device("meta"):  # shape only: counts parameters at any size, whatever the layout
        n_params = GPT(gpt_config).num_parameters()
    layout = f"{ds.pipeline_stages} pipeline stages x " if ds.pipeline_stages > 1 else ""
    precision = "bf16" if ds.bf16 else "fp16" if ds.fp16 else "fp32"
    metrics.print(
        f"ds_trainer {__version__} | {gpt_config.n_layer} layers, {n_params:,} parameters | "
        f"{n_train:,} train windows of {run.context_length} | ZeRO-{ds.zero_stage} {precision} on {world} rank(s) "
        f"({layout}{dp_size} data-parallel), global batch {ds.train_batch_size} = {ds.micro_batch_size} x "
        f"{ds.gradient_accumulation_steps} x {dp_size} | {ds.total_steps} steps"
    )
    stop = StopRequest(run.train.time_limit, run.train.stop_grace, world)
    watchdog = Watchdog(run.train.watchdog_timeout)
    incidents = IncidentLog(run.run_dir / "incidents.jsonl" if rank == 0 else None)
    trainer = Trainer(
        engine,
        ds,
        train_data,
        val_data,
        sampler,
        progress,
        checkpointer,
        metrics,
        settings,
        stop,
        watchdog,
        guard,
        incidents,
        faults,
    )
    try:
        code = trainer.fit()
    finally:
        metrics.close()
    leave_distributed()
    return code


def check_resumed_lr(engine: Any, ds: ResolvedDSConfig, step: int, consumed: int) -> str | None:
    """Make sure the next update uses the schedule's learning rate for the step resumed at.

    The scheduler's position must have come back with the checkpoint (else: error). The optimizer's
    learning rate is the one saved, from the schedule as it was then; after an accepted change (e.g.
    train.max_steps, which stretches the cosine) it is set from the current schedule, and said so.
    """
    scheduler = engine.lr_scheduler
    if scheduler is None:
        return None
    iteration = consumed / ds.train_batch_size if ds.rampup_start_batch is not None else step
    position = getattr(scheduler, "last_batch_iteration", iteration)
    if not math.isclose(position, iteration, abs_tol=1e-9):
        raise DsTrainerError(
            f"the checkpoint's scheduler is at iteration {position} but the run resumes at step {step}; "
            "its scheduler state was not restored: resume from another checkpoint"
        )
    want = schedule_lr(ds.config, iteration)
    got = engine.get_lr()[0]
    if want is None or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15):
        return None
    scheduler.step(iteration)
    now = engine.get_lr()[0]
    if not math.isclose(now, want, rel_tol=1e-9, abs_tol=1e-15):
        raise DsTrainerError(
            f"after resuming at step {step} the learning rate is {now:.6g}, the schedule says {want:.6g}"
        )
    return f"learning rate {got:.6g} → {now:.6g}, the current schedule's value at step {step}"
