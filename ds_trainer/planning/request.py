"""What `plan()` is asked: a model on nodes × gpus_per_node and the run's settings, and their checks."""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass

from ds_trainer.errors import DsTrainerError, join_problems
from ds_trainer.model import PRESETS, GPTConfig
from ds_trainer.planning.constants import (
    ATTENTION_MODES,
    DEFAULT_CPU_MEMORY_GB,
    DEFAULT_NVME_GB,
    DEFAULT_PEAK_TFLOPS,
    DTYPE_BYTES,
    OFFLOAD_DEVICES,
    TOKENS_PER_PARAM,
)
from ds_trainer.planning.figures import Layout
from ds_trainer.planning.shape import model_config


@dataclass(frozen=True)
class PlanRequest:
    """The input of `plan()`. Memory sizes are in GiB (2**30 bytes). Nothing is checked here: `plan()`
    raises DsTrainerError on bad values."""

    model: GPTConfig | str
    """A GPTConfig or a preset name (ds_trainer.model.PRESETS)."""
    _: KW_ONLY
    zero: int = 0
    """ZeRO stage: 0, 1, 2 or 3."""
    offload: str = "none"
    """Where offloaded states go: none, cpu (ZeRO-1 to 3) or nvme (ZeRO-3)."""
    offload_params: bool | None = None
    """ZeRO-3 only: offload the parameters too; None means on whenever ZeRO-3 offloads."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 1
    """GPUs per node; every GPU is one data-parallel rank."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU, GiB."""
    micro_batch: int = 4
    """Sequences per GPU per forward pass; the suggestion may lower it and accumulate gradients instead."""
    context: int | None = None
    """Tokens per sequence; None means the model's block_size."""
    dtype: str = "bf16"
    """Training precision: bf16, fp16 or fp32."""
    mfu: float = 0.4
    """Model FLOPs utilisation, in (0, 1]. The default is a round figure below what large runs report with
    PaLM's definition (the one ds_trainer logs as perf/mfu): 46.2 % for PaLM 540B on TPU v4 (Chowdhery et
    al. 2022, table 3) and 55.2 % for a 175B model on 12,288 GPUs (MegaScale, Jiang et al. 2024)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device; None means DEFAULT_PEAK_TFLOPS for the dtype."""
    tokens: int | None = None
    """Training tokens; None means tokens_per_param × parameters."""
    tokens_per_param: float = TOKENS_PER_PARAM
    """Token budget per parameter when `tokens` is None (Chinchilla: ~20)."""
    cpu_memory_gb: float = DEFAULT_CPU_MEMORY_GB
    """CPU memory per node for CPU offload, GiB."""
    nvme_gb: float = DEFAULT_NVME_GB
    """NVMe space per node for NVMe offload, GiB."""
    attention: str = "flash"
    """flash (fused SDPA, no a·s² scores kept) or math (stores the scores)."""
    ds_buffer_factor: float = 1.5
    """DeepSpeed's `additional_buffer_factor` for its estimator's CPU figure."""


@dataclass(frozen=True)
class ResolvedRequest:
    """A checked PlanRequest with its defaults filled in."""

    request: PlanRequest
    cfg: GPTConfig
    model_name: str
    layout: Layout
    context: int
    peak_tflops: float


def resolve_request(request: PlanRequest) -> ResolvedRequest:
    """Check `request` (DsTrainerError on the first bad value) and fill in its defaults."""
    r = request
    cfg, model_name = _resolve_model(r.model)
    layout = _resolve_layout(r.zero, r.offload, r.offload_params)
    if r.dtype not in DTYPE_BYTES:
        raise DsTrainerError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {r.dtype!r}")
    if r.attention not in ATTENTION_MODES:
        raise DsTrainerError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {r.attention!r}")
    for name, value in (
        ("nodes", r.nodes),
        ("gpus_per_node", r.gpus_per_node),
        ("micro_batch", r.micro_batch),
    ):
        _check_positive(name, value)
    for name, value in (
        ("gpu_memory_gb", r.gpu_memory_gb),
        ("cpu_memory_gb", r.cpu_memory_gb),
        ("nvme_gb", r.nvme_gb),
        ("tokens_per_param", r.tokens_per_param),
    ):
        _check_positive(name, value, integer=False)
    if not isinstance(r.mfu, int | float) or not 0 < r.mfu <= 1:
        raise DsTrainerError(f"mfu must be in (0, 1], got {r.mfu!r}")
    peak_tflops = DEFAULT_PEAK_TFLOPS[r.dtype] if r.peak_tflops is None else r.peak_tflops
    _check_positive("peak_tflops", peak_tflops, integer=False)
    context = cfg.block_size if r.context is None else r.context
    _check_positive("context", context)
    if context > cfg.block_size:
        raise DsTrainerError(
            f"context {context} is longer than the model's block_size {cfg.block_size}; raise --block_size or lower --context"
        )
    if r.tokens is not None:
        _check_positive("tokens", r.tokens)
    return ResolvedRequest(r, cfg, model_name, layout, context, peak_tflops)


def _resolve_model(model: GPTConfig | str) -> tuple[GPTConfig, str]:
    if isinstance(model, str):
        return model_config(model), model
    problems = model.problems()
    if problems:
        raise DsTrainerError(join_problems(problems))
    return model, next((k for k, v in PRESETS.items() if v == model), "custom model")


def _resolve_layout(zero: int, offload: str, offload_params: bool | None) -> Layout:
    if isinstance(zero, bool) or not isinstance(zero, int) or not 0 <= zero <= 3:
        raise DsTrainerError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero}")
    if offload not in OFFLOAD_DEVICES:
        raise DsTrainerError(f"offload must be one of {', '.join(OFFLOAD_DEVICES)}, got {offload!r}")
    if offload != "none" and zero == 0:
        raise DsTrainerError(
            "offload needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads only ZeRO-partitioned states)"
        )
    if offload == "nvme" and zero < 3:
        raise DsTrainerError(
            "NVMe offload (ZeRO-Infinity) needs ZeRO stage 3; use --offload cpu at stage 1 or 2"
        )
    if offload_params and zero < 3:
        raise DsTrainerError(
            "parameter offload needs ZeRO stage 3; at stage 1 and 2 only the optimizer is offloaded"
        )
    if offload_params and offload == "none":
        raise DsTrainerError("parameter offload needs --offload cpu or nvme")
    params_dev = offload if (offload != "none" and zero == 3 and offload_params is not False) else "none"
    return Layout(zero, offload, params_dev)


def _check_positive(name: str, value: float, integer: bool = True) -> None:
    bad = isinstance(value, bool) or (
        not isinstance(value, int) if integer else not isinstance(value, int | float)
    )
    if bad or value <= 0 or (not integer and not math.isfinite(value)):
        kind = "a positive integer" if integer else "a positive number"
        raise DsTrainerError(f"{name} must be {kind}, got {value!r}")
