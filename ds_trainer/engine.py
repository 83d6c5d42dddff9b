"""The model and the DeepSpeed engine around it: the one place that calls deepspeed.initialize."""

from __future__ import annotations

import deepspeed
import torch.nn as nn

from ds_trainer import ds_internals
from ds_trainer.ds_config import ResolvedDSConfig
from ds_trainer.model import GPT, GPTConfig


def parameter_groups(model: nn.Module, decay_all: bool = False) -> list[dict]:
    """Weight decay only on matrices of linear layers: biases, LayerNorm weights and embeddings get none.
    With `decay_all`, one group that decays everything (the books' `AdamW(model.parameters())`)."""
    if decay_all:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # a tied weight belongs to the embedding that owns it first
            seen.add(id(p))
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(config: GPTConfig, ds: ResolvedDSConfig, partition: str = "parameters") -> nn.Module:
    """The GPT as the DeepSpeed config wants it built.

    Under ZeRO-3 the model is constructed inside zero.Init, so each rank only ever allocates its own
    partition (DeepSpeed gathers a module's parameters around `apply`, which our initialisation uses).
    With pipeline stages it is a GPTPipeline holding only this rank's stage. A JSON
    `activation_checkpointing` section turns on per-block recomputation, tuned by that section.
    """
    checkpoint_blocks = "activation_checkpointing" in ds.config
    if checkpoint_blocks:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds.config)
    if ds.pipeline_stages > 1:
        from ds_trainer.pipeline import GPTPipeline

        return GPTPipeline(config, ds.pipeline_stages, partition, checkpoint_blocks)
    if ds.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds.config):
            model = GPT(config)
    else:
        model = GPT(config)
    if checkpoint_blocks:
        model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    return model


def data_parallel_coords(engine: deepspeed.DeepSpeedEngine) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas; pipeline stages share one."""
    if ds_internals.is_pipeline_engine(engine):
        return engine.grid.data_parallel_id, engine.grid.data_parallel_size
    return engine.global_rank, engine.world_size


def build_engine(
    model: nn.Module, ds: ResolvedDSConfig, decay_all: bool = False, compile: bool = False
) -> deepspeed.DeepSpeedEngine:
    """The engine over `model`. With `compile`, DeepSpeed's `engine.compile()` wraps the module in
    torch.compile with the accelerator's backend (inductor), tuned by the JSON's `compile` section; the
    graphs are built lazily, in the first forward and backward."""
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, decay_all),
        config=ds.config,
        lr_scheduler=ds_internals.client_scheduler(ds.config),  # None: DeepSpeed builds the JSON's
    )
    ds_internals.start_schedule_at_zero(scheduler)
    if ds.zero_stage == 0 and ds.pipeline_stages == 1 and ds.data_parallel_size == 1:
        ds_internals.skip_lone_gradient_allreduce(engine)
    if compile:
        engine.compile()
    return engine
