"""Memory per GPU and per node: model states (the ZeRO paper's, the planner's, DeepSpeed's estimator),
activations and DeepSpeed's communication buffers. The formulas are explained in docs/planning.md."""

from __future__ import annotations

from typing import Any

from ds_trainer.ds_internals import estimate_model_states
from ds_trainer.ds_rules import AUTO
from ds_trainer.ds_validate import zero_stage
from ds_trainer.model import GPTConfig
from ds_trainer.offload import DS_PREFETCH_BUCKET, DS_SUB_GROUP
from ds_trainer.planning.constants import (
    DS_DDP_ALLREDUCE_BUCKET,
    DS_DEFAULT_BUCKET,
    DTYPE_BYTES,
)
from ds_trainer.planning.figures import Activations, DeepSpeedEstimate, Layout, ModelStates, ParamCount


def _per_node(per_rank: float, gpus_per_node: int) -> int:
    return int(per_rank * gpus_per_node)


def zero_paper_states(
    n_params: int, layout: Layout, dtype: str, nodes: int = 1, gpus_per_node: int = 1
) -> ModelStates:
    """The ZeRO paper's figures: 2 + 2 + 12 bytes per parameter (fp32: 4 + 4 + 8), partitioned by stage."""
    p, n = n_params, nodes * gpus_per_node
    w = DTYPE_BYTES[dtype]
    k = 12 if dtype != "fp32" else 8
    params = w * p / n if layout.stage >= 3 else w * p
    grads = w * p / n if layout.stage >= 2 else w * p
    optimizer = k * p / n if layout.stage >= 1 else k * p
    moved = {"cpu": 0.0, "nvme": 0.0}
    if layout.offload_optimizer != "none":
        # ZeRO-Offload moves the optimizer states and, with partitioned gradients, the gradients.
        moved[layout.offload_optimizer] += optimizer + (grads if layout.stage >= 2 else 0)
        optimizer = 0
        grads = 0 if layout.stage >= 2 else grads
    if layout.offload_params != "none":
        moved[layout.offload_params] += params
        params = 0
    return ModelStates(
        int(params),
        int(grads),
        int(optimizer),
        cpu_per_node=_per_node(moved["cpu"], gpus_per_node),
        nvme_per_node=_per_node(moved["nvme"], gpus_per_node),
    )


def model_states(
    params: ParamCount, layout: Layout, dtype: str, nodes: int = 1, gpus_per_node: int = 1
) -> ModelStates:
    """The planner's model states: the ZeRO paper's terms plus DeepSpeed's extra copies (docs/planning.md)."""
    p, big, n = params.total, params.largest_layer, nodes * gpus_per_node
    w = DTYPE_BYTES[dtype]
    mixed = dtype != "fp32"
    stage = layout.stage
    off_opt = layout.offload_optimizer != "none"
    off_par = layout.offload_params != "none"
    moved = {"cpu": 0.0, "nvme": 0.0}

    # Parameters: the working copy (16-bit, or fp32), partitioned at ZeRO-3.
    gpu_params = w * p if stage < 3 else (0 if off_par else w * p / n)
    if off_par:
        moved[layout.offload_params] += w * p / n

    # Gradients: the model-dtype gradient buffer (ZeRO-2/3 partitioned). With the optimizer offloaded,
    # reduced gradients stream into fp32 buffers on the CPU: ZeRO-1 still holds its full .grad until
    # then, ZeRO-2/3 nothing but the reduce buckets.
    gpu_grads = w * p if stage <= 1 else (0 if off_opt else w * p / n)

    # Optimizer states: Adam's two moments, plus the fp32 master weights (mixed precision, or any ZeRO stage).
    master = 4 if (mixed or stage >= 1) else 0
    if stage == 0:
        gpu_opt = (8 + master) * p
    elif off_opt:
        gpu_opt = 0
        # The offloaded partition: fp32 master + fp32 gradients + Adam moments, and ZeRO-1/2's pinned
        # 16-bit staging copy of the partition (param_buffer_of_bit16_for_cpu_offload_groups).
        moved[layout.offload_optimizer] += (4 + 4 + 8) * p / n
        if stage < 3:
            moved["cpu"] += w * p / n
    else:
        gpu_opt = (8 + master) * p / n

    # The update's fp32 gradient copies, next to the buffer they are copied from.
    groups = [min(g, DS_SUB_GROUP) if stage == 3 else g for g in params.groups]
    if stage == 0:
        # FP16_Optimizer: per group, a list of per-parameter fp32 copies, then their flat fp32 buffer;
        # the flat buffers of earlier groups stay.
        update = max(4 * sum(groups[: i + 1]) + 4 * g for i, g in enumerate(groups)) if mixed else 0
    elif off_opt:
        update = 0  # the step runs on the CPU
    else:
        # flatten(group's gradient views) in the model dtype, then .to(fp32) (in fp32 the flatten is it).
        update = max((4 + (w if mixed else 0)) * g / n for g in groups)

    # ZeRO-3 gathers one module's full weights and produces its full gradient before the reduce-scatter.
    working_set = 2 * w * big if stage == 3 else 0

    return ModelStates(
        int(gpu_params),
        int(gpu_grads),
        int(gpu_opt),
        working_set=int(working_set),
        update=int(update),
        cpu_per_node=_per_node(moved["cpu"], gpus_per_node),
        nvme_per_node=_per_node(moved["nvme"], gpus_per_node),
    )


def deepspeed_estimate(
    params: ParamCount, layout: Layout, nodes: int = 1, gpus_per_node: int = 1, buffer_factor: float = 1.5
) -> DeepSpeedEstimate | None:
    """DeepSpeed's model-state estimator for this layout; None at ZeRO-0/1, which have none.

    `estimate_zero2_model_states_mem_needs_all_cold` / `estimate_zero3_..._all_cold` only print a
    table; they compute each row with `estimate_zero{2,3}_model_states_mem_needs`, which this calls with
    the same arguments (ZeRO-3 with `zero_init=True`: ds_trainer builds ZeRO-3 models in zero.Init),
    reached through ds_trainer.ds_internals.estimate_model_states. DeepSpeed assumes 16-bit weights and has no NVMe variant (its CPU-offload figures are shown).
    """
    off_opt = layout.offload_optimizer != "none"
    off_par = layout.offload_params != "none"
    note = (
        "no NVMe estimator in DeepSpeed: CPU-offload figures"
        if "nvme"
        in (
            layout.offload_optimizer,
            layout.offload_params,
        )
        else ""
    )
    if layout.stage == 2:
        cpu, gpu = estimate_model_states(2)(
            total_params=params.total,
            num_gpus_per_node=gpus_per_node,
            num_nodes=nodes,
            cpu_offload=off_opt,
            additional_buffer_factor=buffer_factor,
        )
        return DeepSpeedEstimate(
            "estimate_zero2_model_states_mem_needs", f"cpu_offload={off_opt}", gpu, cpu, buffer_factor, note
        )
    if layout.stage == 3:
        cpu, gpu, _ = estimate_model_states(3)(
            total_params=params.total,
            largest_layer_params=params.largest_layer,
            num_gpus_per_node=gpus_per_node,
            num_nodes=nodes,
            cpu_offload=off_opt,
            cpu_offload_params=off_par,
            zero_init=True,
            additional_buffer_factor=buffer_factor,
        )
        return DeepSpeedEstimate(
            "estimate_zero3_model_states_mem_needs",
            f"cpu_offload={off_opt}, cpu_offload_params={off_par}, zero_init=True",
            gpu,
            cpu,
            buffer_factor,
            note,
        )
    return None


def activation_memory(
    cfg: GPTConfig, micro_batch: int, context: int, dtype: str = "bf16", attention: str = "flash"
) -> Activations:
    """Korthikanti et al. 2022 per layer, adapted to our attention and dtype (docs/planning.md)."""
    b, s, h, a = micro_batch, context, cfg.n_embd, cfg.n_head
    w = DTYPE_BYTES[dtype]
    sbh = s * b * h
    dropout = cfg.dropout > 0
    per_layer = 16 * w * sbh + (2 * sbh if dropout else 0)
    if attention == "flash":
        per_layer += 4 * a * s * b  # logsumexp, fp32
    else:
        per_layer += (2 * w + 1 if dropout else w) * a * s * s * b
    logits = 4 * b * s * cfg.vocab_size
    return Activations(
        n_layer=cfg.n_layer,
        per_layer=per_layer,
        block_input=w * sbh,
        head=2 * w * sbh + (sbh if dropout else 0),
        logits=logits,
        loss_backward=2 * logits,
    )


def buffer_bytes(ds_config: dict[str, Any], params: ParamCount, dtype: str, world: int) -> int:
    """Communication buckets and persistent parameters DeepSpeed allocates for this JSON, per GPU."""
    w = DTYPE_BYTES[dtype]
    zero = ds_config.get("zero_optimization", {})
    stage = zero_stage(ds_config)
    reduce = _setting(zero, "reduce_bucket_size", DS_DEFAULT_BUCKET)
    if stage == 0:
        return min(params.total, DS_DDP_ALLREDUCE_BUCKET) * w if world > 1 else 0
    if stage in (1, 2):
        overlap = bool(zero.get("overlap_comm", False))
        contiguous = bool(zero.get("contiguous_gradients", True))
        allgather = _setting(zero, "allgather_bucket_size", DS_DEFAULT_BUCKET)
        buckets = reduce * (2 if overlap else 1) if contiguous else 0
        return (buckets + min(allgather, params.total)) * w
    overlap = bool(zero.get("overlap_comm", True))
    prefetch = _setting(zero, "stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET)
    return (reduce * (2 if overlap else 1) + prefetch + params.small) * w


def _setting(zero: dict[str, Any], key: str, default: int) -> int:
    """A size from the JSON; "auto" counts as DeepSpeed's default, the most the offload rules give it."""
    value = zero.get(key, default)
    return default if value == AUTO else int(value)
