"""Model FLOPs per token and each device's peak: what MFU (model FLOPs utilisation) is measured against.

FLOPs per token follow PaLM's definition (Chowdhery et al. 2022, appendix B): 6·N for the N weights that
multiply (every nn.Linear of the model as built, the output head included, tied or not; embeddings are
lookups, biases and LayerNorm are left out) plus 12·L·T·d for attention's two T×T products, forward and
backward. Activation recomputation is not counted: MFU is the model's work over the time taken, so
recomputing makes MFU lower, as it should.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from ds_trainer.model import GPT, GPTConfig

# Dense peak TFLOP/s per device, from NVIDIA's datasheets (the with-sparsity figures halved). The first
# name that occurs as a word in torch.cuda.get_device_name() wins ("A10" is not "A10G"), so the more
# specific names come first. fp32 is
# the plain (non-tensor-core) rate: PyTorch does not use TF32 for matmuls unless told to.
#   H100 SXM / H200: "NVIDIA H100 Tensor Core GPU" datasheet and "NVIDIA H200" product brief (same SMs):
#     989 bf16/fp16, 67 fp32. H100 PCIe: 756 bf16/fp16, 51 fp32.
#   A100 (40 and 80 GB, SXM and PCIe): "NVIDIA A100 Tensor Core GPU" datasheet: 312 bf16/fp16, 19.5 fp32.
#   L40S: "NVIDIA L40S" datasheet: 362 bf16/fp16, 91.6 fp32. A10: "NVIDIA A10" datasheet: 125 bf16/fp16,
#     31.2 fp32. A GPU not listed (A10G, consumer cards) gets no MFU unless log.peak_tflops says its peak.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROBE_SECONDS = 0.3  # the CPU probe's budget: enough for a stable figure, little at start-up


def matmul_weights(cfg: GPTConfig) -> int:
    """Weights that multiply: every nn.Linear's weight of the model as built (shapes only, on meta)."""
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(cfg: GPTConfig, context: int) -> float:
    """Training FLOPs per token (forward and backward) at context length `context`, PaLM's way."""
    return 6.0 * matmul_weights(cfg) + 12.0 * cfg.n_layer * context * cfg.n_embd


def gpu_peak_tflops(device_name: str, dtype: str) -> float | None:
    for name, peaks in GPU_PEAK_TFLOPS.items():
        if re.search(rf"\b{re.escape(name)}\b", device_name):
            return peaks[dtype]
    return None


def cpu_peak_tflops(dtype: str) -> float:
    """What this CPU does in a square matmul of the run's dtype: the largest size (up to 2048) that fits
    the probe's budget, its fastest repeat after a warm-up (the fastest is the least disturbed by other
    work). A CPU has no datasheet figure that PyTorch reaches."""
    dt, n, best = DTYPES[dtype], 256, 0.0
    while True:
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b  # warm-up: the kernel choice and the first touch of the memory
        fastest, spent, reps = float("inf"), 0.0, 0
        while reps < 3 or spent < PROBE_SECONDS / 4:
            start = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - start
            fastest, spent, reps = min(fastest, seconds), spent + seconds, reps + 1
        best = max(best, 2.0 * n**3 / fastest / 1e12)
        if n >= 2048 or fastest * 8 * 3 > PROBE_SECONDS:  # the next size takes 8x as long
            return best
        n *= 2


def device_peak_tflops(dtype: str, override: float | None) -> tuple[float, str] | None:
    """(peak TFLOP/s per device, where the figure comes from); None for a GPU the table does not know."""
    if override is not None:
        return override, "log.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_tflops(name, dtype)
        return None if peak is None else (peak, f"{name} datasheet, {dtype} dense")
    return cpu_peak_tflops(dtype), f"a {dtype} matmul probe on this CPU"


@dataclass(frozen=True)
class Utilisation:
    """Turns a job's tokens per second into achieved TFLOP/s per device and MFU."""

    flops_per_token: float
    devices: int  # every rank of the job (data-parallel and pipeline stages)
    peak_tflops: float | None  # None: no known peak, no MFU

    def tflops_per_device(self, tokens_per_sec: float) -> float:
        return tokens_per_sec * self.flops_per_token / self.devices / 1e12

    def mfu(self, tokens_per_sec: float) -> float | None:
        if self.peak_tflops is None:
            return None
        return self.tflops_per_device(tokens_per_sec) / self.peak_tflops


def run_utilisation(
    cfg: GPTConfig, context: int, devices: int, dtype: str, override: float | None, measure: bool
) -> tuple[Utilisation, str]:
    """The run's Utilisation and the line that says what MFU is measured against. Only the rank that logs
    (`measure`) looks up or probes the peak: a probe on every rank of one CPU would measure the sharing."""
    per_token = flops_per_token(cfg, context)
    found = device_peak_tflops(dtype, override) if measure else None
    if found is None:
        return Utilisation(per_token, devices, None), (
            f"{per_token:.3e} FLOPs per token; no MFU: no known peak for this device, set log.peak_tflops"
        )
    peak, source = found
    return Utilisation(per_token, devices, peak), (
        f"{per_token:.3e} FLOPs per token; MFU against {peak:.3g} TFLOP/s per device ({source})"
    )
