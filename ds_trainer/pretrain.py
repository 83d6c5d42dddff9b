"""Assembly: from a run config and a DeepSpeed JSON to a running Trainer."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ds_trainer import __version__
from ds_trainer.checkpoint import Checkpointer, Progress
from ds_trainer.config import RunConfig
from ds_trainer.data import GlobalBatchSampler, SampleStream, build_datasets
from ds_trainer.ds_config import launcher_world_size, load_ds_json, resolve
from ds_trainer.engine import (
    accelerator_name,
    build_engine,
    build_model,
    data_parallel_coords,
    init_distributed,
)
from ds_trainer.metrics import Metrics
from ds_trainer.model import GPT
from ds_trainer.tokenizer import identity
from ds_trainer.trainer import LoopSettings, Trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(run: RunConfig, ds_config_path: str | None) -> None:
    # Every check that reads only files and the environment runs before the process group exists,
    # so a bad input stops every rank with the same message instead of leaving peers waiting.
    raw, source = load_ds_json(ds_config_path)
    gpt_config = run.gpt_config()
    train_data, val_data, weights = build_datasets(
        run.data_sources(), run.context_length, run.stride, run.data.val_fraction, gpt_config.vocab_size
    )
    world = launcher_world_size()
    ds = resolve(raw, source, run, world, sum(train_data.sizes()), accelerator_name())

    init_distributed()
    rank = int(os.environ["RANK"])
    seed_everything(run.train.seed)  # the same initial weights on every rank
    model = build_model(gpt_config, ds, run.pipeline.partition)
    engine = build_engine(model, ds)
    seed_everything(run.train.seed + 1 + rank)  # different dropout draws per rank

    dp_rank, dp_size = data_parallel_coords(engine)
    stream = SampleStream(train_data.sizes(), weights, run.train.seed)
    sampler = GlobalBatchSampler(stream, ds.micro_batch_size, dp_rank, dp_size)
    progress = Progress()
    metrics = Metrics.for_rank(rank, run.tensorboard_dir, run.jsonl_path)
    configs = {
        "run_config": run.to_dict(),
        "ds_config": ds.config,
        "meta": {
            "ds_trainer": __version__,
            "tokenizer": identity(),
            "world_size": world,
            "torch": torch.__version__,
        },
    }
    checkpointer = Checkpointer(run.run_dir, rank, {"progress": progress, "sampler": sampler}, configs)
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
        resume=run.checkpoint.resume,
    )
    with torch.device("meta"):  # shape only: counts parameters at any size, whatever the layout
        n_params = GPT(gpt_config).num_parameters()
    layout = f"{ds.pipeline_stages} pipeline stages x " if ds.pipeline_stages > 1 else ""
    metrics.print(
        f"ds_trainer {__version__} | {gpt_config.n_layer} layers, {n_params:,} parameters | "
        f"{sum(train_data.sizes()):,} train windows of {run.context_length} | ZeRO-{ds.zero_stage} on {world} rank(s) "
        f"({layout}{dp_size} data-parallel), global batch {ds.train_batch_size} = {ds.micro_batch_size} x "
        f"{ds.gradient_accumulation_steps} x {dp_size} | {ds.total_steps} steps"
    )
    trainer = Trainer(engine, ds, train_data, val_data, sampler, progress, checkpointer, metrics, settings)
    try:
        trainer.fit()
    finally:
        metrics.close()
