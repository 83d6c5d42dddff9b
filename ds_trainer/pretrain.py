"""Assembly: from a run config and a DeepSpeed JSON to a finished (or stopped) run.

`pretrain` is four named steps: check the inputs (before any process group, so every rank stops with
the same message), choose what to resume from (which may change the layout's batch figures), build the
components, and fit. Nothing is changed after it is built: each step returns new values.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ds_trainer import __version__, host_malloc
from ds_trainer.checkpoint.checkpointer import Checkpointer
from ds_trainer.checkpoint.identity import layout_of, run_configs
from ds_trainer.checkpoint.resume import ResumePlan, convert_if_needed, find_resume, newer_than, set_aside
from ds_trainer.checkpoint.state import Progress
from ds_trainer.collectives import Group
from ds_trainer.config import RunConfig
from ds_trainer.data import GlobalBatchSampler, SampleStream, WindowSet, build_datasets
from ds_trainer.ds_config import ResolvedDSConfig, launcher_world_size, load_ds_json, resolve
from ds_trainer.engine import build_engine, build_model, data_parallel_coords
from ds_trainer.errors import Problems
from ds_trainer.evaluator import Evaluator
from ds_trainer.faults import Faults
from ds_trainer.flops import run_utilisation
from ds_trainer.guard import IncidentLog, LossGuard
from ds_trainer.metrics import Metrics
from ds_trainer.model import GPT, GPTConfig
from ds_trainer.pipeline import parse_partition
from ds_trainer.planning.shape import count_parameters
from ds_trainer.preemption import Stopper, StopRequest
from ds_trainer.process import accelerator_device, accelerator_name, init_distributed, leave_distributed
from ds_trainer.recovery import Recovery
from ds_trainer.run_folders import folder_problems
from ds_trainer.step import BatchSource, PipelineStep, build_step
from ds_trainer.step_log import StepLogger
from ds_trainer.trainer import Trainer
from ds_trainer.warm_start import init_from_problems, load_initial_weights
from ds_trainer.watchdog import Watchdog


@dataclass(frozen=True)
class Inputs:
    """Everything read and checked before the process group exists."""

    raw_ds: dict[str, Any]
    ds_source: str
    ds: ResolvedDSConfig
    gpt_config: GPTConfig
    train_data: WindowSet
    val_data: WindowSet | None
    weights: list[float] | None
    world: int
    faults: Faults

    @property
    def train_windows(self) -> int:
        return sum(self.train_data.sizes())


def pretrain(run: RunConfig, ds_config_path: str | None) -> int:
    """Train; returns the process exit code (0 finished, REQUEUE_EXIT stopped early with a checkpoint)."""
    inputs = check_inputs(run, ds_config_path)
    # Before the model and the engine allocate: the policy holds for the blocks malloc serves after it.
    tight = host_malloc.tight(count_parameters(inputs.gpt_config).total, inputs.ds.host.share)
    malloc_line = host_malloc.choose(
        run.train.host_malloc, accelerator_name() == "cpu", inputs.ds.offloaded, tight
    ).apply()
    init_distributed()
    rank = int(os.environ["RANK"])
    group = Group(inputs.world, accelerator_device())
    metrics = Metrics.for_rank(rank, run)
    metrics.print_line(malloc_line)
    try:
        ds, resume_plan = choose_resume(run, inputs, group, rank, metrics)
        trainer = build_trainer(run, inputs, ds, resume_plan, group, rank, metrics)
        code = trainer.fit()
    finally:
        metrics.close()
    leave_distributed()
    return code


def check_inputs(run: RunConfig, ds_config_path: str | None) -> Inputs:
    """Every check that reads only files and the environment: the JSON, the data, their fit, the layout,
    what the pipeline refuses and the run's folders. Raises one error naming every problem."""
    problems = Problems()
    gpt_config, world, rank = run.gpt_config(), launcher_world_size(), int(os.environ.get("RANK", "0"))
    raw = source = ds = data = faults = None
    with problems.collect():
        raw, source = load_ds_json(ds_config_path)
    with problems.collect():
        sources, vocab = run.data_sources(), gpt_config.vocab_size
        data = build_datasets(sources, run.context_length, run.stride, run.data.val_fraction, vocab)
    if raw is not None:
        with problems.collect():
            n_train = sum(data[0].sizes()) if data is not None else None
            ds = resolve(raw, source, run, world, n_train, accelerator_name())
    if run.pipeline.stages > 1:
        with problems.collect():
            parse_partition(run.pipeline.partition, gpt_config.n_layer, run.pipeline.stages)
    with problems.collect():
        faults = Faults.from_env(rank, run.run_dir)
    if faults is not None and run.pipeline.stages > 1:
        problems.add(faults.pipeline_problem())
    problems.extend(folder_problems(run, rank))
    if run.model.init_from:
        problems.extend(init_from_problems(run.model.init_from, gpt_config))
    problems.raise_if_any()
    train_data, val_data, weights = data
    return Inputs(raw, source, ds, gpt_config, train_data, val_data, weights, world, faults)


def choose_resume(
    run: RunConfig, inputs: Inputs, group: Group, rank: int, metrics: Metrics
) -> tuple[ResolvedDSConfig, ResumePlan | None]:
    """Collective: the DeepSpeed config to build with, and the checkpoint to resume from (None: a fresh
    start). On a new layout the config keeps the checkpoint's global batch and loads DeepSpeed's universal
    format, converted here once."""
    ds = inputs.ds
    if not run.checkpoint.resume:
        return ds, None
    configs = run_configs(run, ds, inputs.gpt_config, inputs.world)
    named = run.checkpoint.resume_from
    plan = find_resume(run.run_dir, configs, group, rank, run.checkpoint.verify == "checksum", named)
    if plan is None:
        return ds, None
    for why in plan.skipped:
        metrics.print_line(f"passed over checkpoint {why}")
    if named is not None and (newer := newer_than(run.run_dir, plan)):
        kept = set_aside(run.run_dir, newer, group, rank)
        metrics.print_line(
            f"branched from {plan.step_tag} (checkpoint.resume_from): moved the {len(newer)} newer checkpoint(s) "
            f"{newer[-1]} … {newer[0]} to {kept} (kept)"
        )
    layout = layout_of(ds, inputs.world)
    if plan.saved_layout != layout:
        ds = resolve(
            inputs.raw_ds, inputs.ds_source, run, inputs.world, inputs.train_windows, accelerator_name(),
            global_batch=plan.global_batch,
        )  # fmt: skip
        if ds.train_batch_size != inputs.ds.train_batch_size:
            kept = (
                f"gradient_accumulation_steps → {ds.gradient_accumulation_steps} to keep the checkpoint's "
                f"global batch of {ds.train_batch_size}"
            )
            plan = dataclasses.replace(plan, accepted=[*plan.accepted, kept])
    if plan.universal:
        ds = ds.loading_universal()
        old = plan.saved_layout
        metrics.print_line(
            f"layout changed (ZeRO-{old['zero_stage']} x {old['data_parallel']} ranks → "
            f"ZeRO-{layout['zero_stage']} x {layout['data_parallel']}): converting through DeepSpeed's universal checkpoint"
        )
    convert_if_needed(plan, run.run_dir, ds.zero_stage, group, rank)
    return ds, plan


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_trainer(
    run: RunConfig,
    inputs: Inputs,
    ds: ResolvedDSConfig,
    resume_plan: ResumePlan | None,
    group: Group,
    rank: int,
    metrics: Metrics,
) -> Trainer:
    """Collective: the engine and every component of the loop, resumed when a checkpoint was chosen."""
    seed_everything(run.train.seed)  # the same initial weights on every rank
    model = build_model(inputs.gpt_config, ds, run.pipeline.partition)
    if run.model.init_from and resume_plan is None:  # a resume takes the checkpoint's weights instead
        # Before deepspeed.initialize: ZeRO-1/2 copy their fp32 master weights from the model there.
        load_initial_weights(model, run.model.init_from, inputs.gpt_config)
        metrics.print_line(f"initial weights from model.init_from {run.model.init_from}")
    # Before the engine: torch.compile starts its compiler workers there, which would slow a CPU's probe.
    utilisation, measured_against = run_utilisation(
        inputs.gpt_config, run.context_length, inputs.world, ds.precision, run.log.peak_tflops, rank == 0
    )
    engine = build_engine(model, ds, run.train.decay_all_parameters, run.train.compile)
    seed_everything(run.train.seed + 1 + rank)  # different dropout draws per rank
    dp_rank, dp_size = data_parallel_coords(engine)
    stream = SampleStream(inputs.train_data.sizes(), inputs.weights, run.train.seed)
    sampler = GlobalBatchSampler(stream, ds.micro_batch_size, dp_rank, dp_size)
    progress, guard, watchdog = Progress(), LossGuard(run.guard), Watchdog(run.train.watchdog_timeout)
    checkpointer = Checkpointer(
        engine, run.checkpoint, ds, group, rank, run_configs(run, ds, inputs.gpt_config, inputs.world),
        {"progress": progress, "sampler": sampler, "guard": guard}, resume_plan, metrics, watchdog,
        inputs.faults,
    )  # fmt: skip
    checkpointer.resume()
    step = build_step(engine, ds, inputs.train_data, group, guard, inputs.faults, run.train.clip_from_step)
    if isinstance(step, PipelineStep):
        metrics.print_line(
            "loss guard off: the pipeline engine updates inside one call, so no update can be withheld"
        )
    metrics.print_line(banner(run, inputs, ds, dp_size))
    metrics.print_line(measured_against)
    incidents = IncidentLog(run.run_dir / "incidents.jsonl" if rank == 0 else None)
    return Trainer(
        total_steps=ds.total_steps,
        progress=progress,
        batches=BatchSource(sampler, ds, inputs.train_data.context_length),
        step=step,
        log=StepLogger(metrics, run.log.interval, ds.total_steps, progress, utilisation, engine.is_compiled),
        recovery=Recovery(engine, guard, checkpointer, sampler, progress, incidents, metrics),
        faults=inputs.faults,
        evaluator=Evaluator(
            step,
            (inputs.train_data, inputs.val_data),
            run.eval,
            run.train.seed,
            ds.total_steps,
            (dp_rank, dp_size),
            lambda: {"eval/tokens_seen": float(progress.tokens_seen), "eval/epoch": sampler.epochs_done},
            metrics,
            watchdog,
        ),
        checkpointer=checkpointer,
        stop=Stopper(
            StopRequest(run.train.time_limit, run.train.stop_grace, group),
            checkpointer,
            metrics,
            ds.total_steps,
        ),
        watchdog=watchdog,
    )


def banner(run: RunConfig, inputs: Inputs, ds: ResolvedDSConfig, dp_size: int) -> str:
    """The run's first line: what trains, on what, for how long."""
    with torch.device("meta"):  # shape only: counts parameters at any size, whatever the layout
        n_params = GPT(inputs.gpt_config).num_parameters()
    layout = f"{ds.pipeline_stages} pipeline stages x " if ds.pipeline_stages > 1 else ""
    return (
        f"ds_trainer {__version__} | {inputs.gpt_config.n_layer} layers, {n_params:,} parameters | "
        f"{inputs.train_windows:,} train windows of {run.context_length} | ZeRO-{ds.zero_stage} {ds.precision} "
        f"on {inputs.world} rank(s) ({layout}{dp_size} data-parallel), global batch {ds.train_batch_size} = "
        f"{ds.micro_batch_size} x {ds.gradient_accumulation_steps} x {dp_size} | {ds.total_steps} steps"
    )
