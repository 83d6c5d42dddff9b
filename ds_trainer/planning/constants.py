"""The planner's assumptions: bytes per dtype, default hardware figures, margins, DeepSpeed's defaults."""

from __future__ import annotations

from ds_trainer.flops import GPU_PEAK_TFLOPS
from ds_trainer.offload import GIB

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_PEAK_TFLOPS = GPU_PEAK_TFLOPS["H100"]
"""Per device, dense: H100 SXM tensor cores for bf16/fp16; fp32 without TF32 (PyTorch's default)."""
TOKENS_PER_PARAM = 20.0
MEMORY_MARGIN = 0.10
"""Share of every memory kept free: fragmentation, allocator caching, what the formulas leave out."""
GPU_FIXED_OVERHEAD = 1 * GIB
"""Per GPU, before any tensor: CUDA context, cuBLAS/cuDNN workspaces, NCCL communicators."""
HOST_PROCESS_BASE = GIB // 2
"""Per rank, before any offloaded state: Python, PyTorch, DeepSpeed and its ops, the data. Measured: a
gpt2-tiny rank with NVMe offload peaks at 0.70 GiB resident, of which 0.2 GiB are its buffers."""
DEFAULT_CPU_MEMORY_GB = 1024.0
DEFAULT_NVME_GB = 2048.0
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
ATTENTION_MODES = ("flash", "math")

# DeepSpeed's defaults for the bucket sizes when a JSON leaves them out (DeepSpeedZeroConfig, 0.19).
DS_DEFAULT_BUCKET = 500_000_000
DS_DDP_ALLREDUCE_BUCKET = 500_000_000


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"
