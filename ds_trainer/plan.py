"""Memory and compute planner: what a GPT run needs per GPU, how long it takes, and a DeepSpeed JSON that fits.

`plan(...)` is a pure function from a model shape and a machine to a `Plan` (typed figures, in bytes,
FLOPs and seconds); `format_plan` turns it into the table `launch/plan.py` prints. Nothing here touches
a GPU: parameter counts come from an exact formula (checked against `GPT.num_parameters()` on the meta
device by the tests) and DeepSpeed's own estimators are plain arithmetic.

Model states (parameters, gradients, optimizer states)
------------------------------------------------------
The ZeRO paper (Rajbhandari et al. 2020) counts, per parameter, 2 bytes of 16-bit weights, 2 of 16-bit
gradients and K = 12 of Adam state (fp32 master weights 4, momentum 4, variance 4) in mixed precision,
and 4 + 4 + 8 in fp32. ZeRO-1 divides the optimizer states over the N data-parallel ranks, ZeRO-2 also
the gradients, ZeRO-3 also the parameters. `zero_paper_states` is exactly that.

`model_states` (the planner's figure) starts from the same terms and adds what DeepSpeed 0.19 actually
allocates, read from its source and checked by measurement (tests/test_plan.py,
benchmarks/plan_vs_measured.py). Held throughout a step:

- params: the model-dtype weights, w·P (w = 2 in bf16/fp16, 4 in fp32), w·P/N at ZeRO-3.
- grads: the model-dtype gradient buffer, w·P at ZeRO-0/1 (ZeRO-1 reduces into partitions only at the
  update), w·P/N at ZeRO-2/3 (`grads_in_partition`, ZeRO-3's `grad_partitions_flat_buffer`).
- optimizer: Adam's two fp32 moments (8 bytes) and the fp32 master weights (4 bytes), divided by N
  from ZeRO-1 on. ZeRO-1/2/3 clone an fp32 master partition (`single_partition_of_fp32_groups`,
  `fp32_partitioned_groups_flat`) even when the model itself is fp32, so fp32 ZeRO-1+ holds 4 + 8 +
  4 bytes there, where ZeRO-0 in fp32 steps the model's own weights (8 bytes).

Present only part of the time, and never together (the peak takes the larger):

- update: the optimizer steps on an fp32 gradient that DeepSpeed materialises next to the buffer it
  comes from. ZeRO-1/2/3 do it one optimizer parameter group (ZeRO-3: sub-group) at a time:
  `flatten(averaged_gradients[i])` (a model-dtype copy; in fp32 this is already the fp32 gradient) then
  `.to(fp32)` as the `.grad` of the group's master partition, while the buffer is alive: (w + 4)·G/N
  in bf16/fp16, 4·G/N in fp32, for the largest group G. FP16_Optimizer (ZeRO-0 in bf16/fp16) builds
  per group a list of per-parameter fp32 copies and flattens it, keeping every group's flat fp32
  gradient: max over groups i of 4·(G_1 + … + G_i) + 4·G_i. ds_trainer has two groups: linear-layer
  matrices with weight decay (12·h²·n_layer for a tied GPT), then everything else.
- working set (ZeRO-3): one module gathered in full for its forward/backward and its full gradient
  before the reduce-scatter, 2·w·L for the largest module L (the token embedding, vocab × n_embd), as
  DeepSpeed's estimator counts it (`4 * largest_layer_params` in 16-bit). It coexists with the
  activations; the update does not.

Offload (ZeRO-Offload / ZeRO-Infinity) moves the fp32 master, fp32 gradient and Adam partitions (16
bytes / N per parameter), ZeRO-1/2's pinned 16-bit staging copy of the partition, and with parameter
offload (ZeRO-3 only) the 16-bit parameter partitions, to CPU memory or NVMe; the update runs there.
The GPU keeps the model-dtype weights (ZeRO-1/2; ZeRO-1 also its full `.grad` until it streams to the
CPU) or, at ZeRO-3, the working set.

So in bf16 at ZeRO-2, gpt2 (124M; G = 68% of P) holds 2 + 14/N bytes per parameter and peaks at
2 + (14 + 6·0.68)/N = 2 + 18.1/N, against DeepSpeed's estimator 2 + 18/N (its "18 = 2_grads_16bit +
4_grads_32bit + 4_params_32bit + 8_optimizer_states"). In fp32 at world size 1 the planner's figures
equal, to the byte, what a live engine holds at ZeRO-0/1/2 (16, 22.7 and 22.7 bytes per parameter for
gpt2).

Not model states, counted separately as "buffers" (from the JSON's bucket sizes): ZeRO-1/2 reduce
buckets (`reduce_bucket_size` elements, twice with `overlap_comm`) and the all-gather bucket, ZeRO-3's
reduce and prefetch buckets and its persistent small parameters, ZeRO-0's gradient all-reduce
flattening (only with more than one rank).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models")
------------------------------------------------------------------------------------------------------
Per transformer layer, micro batch b, context s, width h, heads a, in 16-bit without tensor or
sequence parallelism: s·b·h·(34 + 5·a·s/h) bytes. Of the 34: 32 are 16 tensors of size s·b·h stored
in 2 bytes (LayerNorm inputs 2×, QKV input, Q, K, V, attention output, MLP input, GeLU input and
output at 4h each) and 2 are the 1-byte dropout masks after attention and after the MLP; the 5·a·s²·b
is the attention matrix: softmax output (2), its dropout mask (1) and the dropout output (2).

How this code applies it (`activation_memory`):

- Tensors scale with the compute dtype: 16·w·s·b·h per layer (w = 2 for bf16/fp16, 4 for fp32).
- Dropout masks (1 byte) only when `dropout > 0`: with p = 0 `nn.Dropout` returns its input and stores
  nothing (our presets use 0).
- Our attention is `F.scaled_dot_product_attention(..., is_causal=True)`. On a GPU it dispatches to the
  flash or memory-efficient kernel (neither ever materialises the a·s² scores: they keep the output,
  already counted, and a logsumexp of a·s·b fp32 values, and regenerate dropout from the RNG seed), so
  the default `attention="flash"` drops the 5·a·s²·b term and adds 4·a·s·b bytes. `attention="math"`
  keeps the term, as the unfused path stores it: (2w + 1 mask)·a·s²·b with dropout, w·a·s²·b without.
- With full per-block activation checkpointing (`deepspeed.checkpointing.checkpoint` around each block,
  what the `activation_checkpointing` JSON section turns on in ds_trainer) each layer keeps only its
  input, w·s·b·h, and backward recomputes one block at a time: n_layer·w·s·b·h + one layer's full set.
- Outside the blocks: the final LayerNorm's input and output (2·w·s·b·h).
- The loss: the model takes cross-entropy on `logits.float()`, so log-softmax keeps b·s·vocab fp32
  values (4·b·s·V bytes) for backward, and backward starts by materialising the fp32 gradients of the
  log-probabilities and of the logits (2 × 4·b·s·V more) while every layer's activations are still held.

Measured on the CPU in fp32 with saved-tensor hooks, the per-layer and head terms agree with the saved
bytes within 1%, with and without checkpointing (tests/test_plan.py). The recomputed block and the
loss gradients are counted together although they peak at different moments: on the safe side.

Fit, compute, suggestion
------------------------
Per GPU the peak is held model states + buffers + max(working set + activations, update): activations
are freed before the optimizer step. A configuration fits when that is ≤ GPU memory × (1 − 10%) −
1 GiB (CUDA context, NCCL communicators, allocator fragmentation), and what moved off the GPU fits 90%
of the node's CPU memory / NVMe space.

Token budget: ~20 tokens per parameter (Hoffmann et al. 2022, "Chinchilla"); training FLOPs ≈ 6·P·D
(forward 2, backward 4 FLOPs per parameter and token; attention's s²-terms and recomputation are left
out, as in the MFU convention); time = FLOPs / (devices × peak × MFU). Default peak per device: 989
TFLOP/s for bf16/fp16 (H100 SXM dense tensor cores, no sparsity), 67 for fp32 (H100 SXM without TF32,
PyTorch's default matmul precision; pass 495 if TF32 is enabled).

The suggestion tries ds_configs/ files in this order and takes the first that fits: zero0, zero1, zero2
(communication like plain data parallelism), the same with activation checkpointing (one more forward
pass), zero3 (50% more communication), zero3 with checkpointing, then the offloads (the optimizer step
on the CPU): zero2_offload_cpu, zero3_offload_cpu, zero3_offload_nvme, each without and with
checkpointing. If none fits at the requested micro batch it retries at each smaller divisor of it, with
gradient accumulation keeping the per-GPU batch.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_trainer.errors import DsTrainerError
from ds_trainer.model import PRESETS, GPTConfig

GIB = 2**30
DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}
"""Per device, dense: H100 SXM tensor cores for bf16/fp16; fp32 without TF32 (PyTorch's default)."""
TOKENS_PER_PARAM = 20.0
MEMORY_MARGIN = 0.10
"""Share of every memory kept free: fragmentation, allocator caching, what the formulas leave out."""
GPU_FIXED_OVERHEAD = 1 * GIB
"""Per GPU, before any tensor: CUDA context, cuBLAS/cuDNN workspaces, NCCL communicators."""
DEFAULT_CPU_MEMORY_GB = 1024.0
DEFAULT_NVME_GB = 2048.0
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
ATTENTION_MODES = ("flash", "math")

# DeepSpeed's defaults for the bucket sizes when a JSON leaves them out (DeepSpeedZeroConfig, 0.19).
DS_DEFAULT_BUCKET = 500_000_000
DS_DEFAULT_PREFETCH_BUCKET = 50_000_000
DS_DEFAULT_PERSISTENCE_THRESHOLD = 100_000
DS_DDP_ALLREDUCE_BUCKET = 500_000_000
DS_DEFAULT_SUB_GROUP = 1_000_000_000

# The section a suggestion turns checkpointing on with is the shipped one, so the planner suggests
# exactly what users run (its "auto" becomes one checkpoint per block when the JSON is resolved).
ACTIVATION_CHECKPOINTING_SECTION: dict[str, Any] = json.loads(
    (DS_CONFIGS / "zero1_activation_checkpointing.json").read_text()
)["activation_checkpointing"]


# ---------------------------------------------------------------------------------------------------
# Typed results
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a GPT, each tied tensor once."""

    total: int
    largest_layer: int
    """Most parameters any single module owns (DeepSpeed's `largest_layer_params`): the token embedding."""
    small: int
    """Parameters in tensors below ZeRO-3's persistence threshold (biases, LayerNorms): kept whole on every rank."""
    groups: tuple[int, ...]
    """Optimizer parameter groups in ds_trainer.engine.parameter_groups' order: with weight decay
    (linear-layer matrices), without (embeddings, biases, LayerNorms)."""


@dataclass(frozen=True)
class Layout:
    """A ZeRO stage and where its offloaded states live."""

    stage: int
    offload_optimizer: str = "none"
    """none, cpu or nvme: fp32 master weights, fp32 gradients and Adam states."""
    offload_params: str = "none"
    """none, cpu or nvme: the 16-bit parameter partitions (ZeRO-3 only)."""

    def describe(self) -> str:
        parts = [f"ZeRO-{self.stage}"]
        if self.offload_optimizer != "none":
            parts.append(f"optimizer on {self.offload_optimizer}")
        if self.offload_params != "none":
            parts.append(f"parameters on {self.offload_params}")
        return ", ".join(parts)


@dataclass(frozen=True)
class ModelStates:
    """Bytes of parameters, gradients and optimizer states on each GPU, and per node off the GPUs.

    `params`, `grads` and `optimizer` are held throughout the step. Two more terms exist only part of
    the time, never together: `working_set` during forward and backward (ZeRO-3's gathered module and
    its full gradient) and `update` during the optimizer step (the fp32 gradient copies).
    """

    params: int
    grads: int
    optimizer: int
    working_set: int = 0
    update: int = 0
    cpu_per_node: int = 0
    nvme_per_node: int = 0

    @property
    def held(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def gpu(self) -> int:
        """Peak of the model states alone on one GPU."""
        return self.held + max(self.working_set, self.update)


@dataclass(frozen=True)
class DeepSpeedEstimate:
    """What DeepSpeed's own estimator says for the same model and layout."""

    function: str
    options: str
    gpu: int
    cpu_per_node: int
    buffer_factor: float
    """DeepSpeed's `additional_buffer_factor`, applied to its CPU figure only."""
    note: str = ""


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one GPU; see the module docstring for the formula."""

    n_layer: int
    per_layer: int
    """One block's saved tensors without checkpointing."""
    block_input: int
    """What a checkpointed block keeps: its input."""
    head: int
    """Final LayerNorm input and output."""
    logits: int
    """fp32 log-probabilities kept for the loss's backward: 4·b·s·vocab."""
    loss_backward: int
    """fp32 gradients of the log-probabilities and the logits at the start of backward: 2 × 4·b·s·vocab."""

    @property
    def full(self) -> int:
        return self.n_layer * self.per_layer + self.head + self.logits + self.loss_backward

    @property
    def checkpointed(self) -> int:
        return self.n_layer * self.block_input + self.per_layer + self.head + self.logits + self.loss_backward

    def total(self, checkpointing: bool) -> int:
        return self.checkpointed if checkpointing else self.full


@dataclass(frozen=True)
class MemoryNeed:
    """Everything one GPU (and its node) needs for a layout, micro batch and checkpointing choice."""

    states: ModelStates
    buffers: int
    activations: int
    gpu_usable: int
    cpu_usable_per_node: int
    nvme_usable_per_node: int

    @property
    def gpu(self) -> int:
        """Peak per GPU: forward/backward (working set + activations) or the update, whichever is larger."""
        s = self.states
        return s.held + self.buffers + max(s.working_set + self.activations, s.update)

    @property
    def fits(self) -> bool:
        return (
            self.gpu <= self.gpu_usable
            and self.states.cpu_per_node <= self.cpu_usable_per_node
            and self.states.nvme_per_node <= self.nvme_usable_per_node
        )

    def shortfall(self) -> str:
        """Which memory is short, and by how much; empty when it fits."""
        out = []
        if self.gpu > self.gpu_usable:
            out.append(f"GPU needs {gib(self.gpu)} GiB of {gib(self.gpu_usable)} GiB usable")
        if self.states.cpu_per_node > self.cpu_usable_per_node:
            out.append(
                f"CPU needs {gib(self.states.cpu_per_node)} GiB per node of {gib(self.cpu_usable_per_node)} GiB usable"
            )
        if self.states.nvme_per_node > self.nvme_usable_per_node:
            out.append(
                f"NVMe needs {gib(self.states.nvme_per_node)} GiB per node of {gib(self.nvme_usable_per_node)} GiB usable"
            )
        return "; ".join(out)


@dataclass(frozen=True)
class Compute:
    """Compute-optimal token budget, training FLOPs and wall-clock time."""

    tokens: int
    tokens_per_param: float
    flops: float
    devices: int
    peak_tflops: float
    mfu: float

    @property
    def seconds(self) -> float:
        return self.flops / (self.devices * self.peak_tflops * 1e12 * self.mfu)


@dataclass(frozen=True)
class Suggestion:
    """The first ds_configs/ layout that fits, and its DeepSpeed JSON."""

    base_file: str
    layout: Layout
    activation_checkpointing: bool
    micro_batch: int
    gradient_accumulation_steps: int
    need: MemoryNeed
    config: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Plan:
    model: GPTConfig
    model_name: str
    params: ParamCount
    nodes: int
    gpus_per_node: int
    dtype: str
    layout: Layout
    micro_batch: int
    context: int
    attention: str
    gpu_memory: int
    zero_paper: ModelStates
    states: ModelStates
    deepspeed: DeepSpeedEstimate | None
    buffers: int
    activations: Activations
    need: MemoryNeed
    """The requested layout without activation checkpointing."""
    need_checkpointed: MemoryNeed
    """The requested layout with activation checkpointing."""
    compute: Compute
    suggestion: Suggestion | None
    no_fit_reason: str | None
    """Why nothing fits (set exactly when `suggestion` is None)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


# ---------------------------------------------------------------------------------------------------
# Model shape
# ---------------------------------------------------------------------------------------------------


def model_config(
    preset: str | None = None,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_embd: int | None = None,
    block_size: int | None = None,
    vocab_size: int | None = None,
) -> GPTConfig:
    """A preset with overrides, or a custom shape (n_layer, n_head and n_embd required); checked."""
    dims = {
        k: v
        for k, v in dict(
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size
        ).items()
        if v is not None
    }
    if preset is not None:
        cfg = GPTConfig.from_preset(preset, **dims)
    else:
        missing = [k for k in ("n_layer", "n_head", "n_embd") if k not in dims]
        if missing:
            raise DsTrainerError(
                f"give --preset ({', '.join(PRESETS)}) or all of --n_layer, --n_head, --n_embd; "
                f"missing {', '.join('--' + m for m in missing)}"
            )
        cfg = GPTConfig(**dims)
    problems = cfg.problems()
    if problems:
        raise DsTrainerError("; ".join(problems))
    return cfg


def count_parameters(
    cfg: GPTConfig, persistence_threshold: int = DS_DEFAULT_PERSISTENCE_THRESHOLD
) -> ParamCount:
    """Exact parameter count of ds_trainer.model.GPT for `cfg` (the tests check it against the model).

    Per block: LayerNorms 2·2h, c_attn 3h² (+3h bias), attn c_proj h² + h, c_fc 4h² + 4h, mlp c_proj
    4h² + h; plus token and position embeddings, the final LayerNorm and, untied, the LM head.
    """
    h, v, t = cfg.n_embd, cfg.vocab_size, cfg.block_size
    qkv_bias = 3 * h if cfg.qkv_bias else 0
    # (parameter count of each tensor) per block, then outside the blocks
    block_tensors = [h, h, 3 * h * h, qkv_bias, h * h, h, h, h, 4 * h * h, 4 * h, 4 * h * h, h]
    outer = [v * h, t * h, h, h] + ([] if cfg.tie_embeddings else [v * h])
    total = cfg.n_layer * sum(block_tensors) + sum(outer)
    # Modules and their own parameters, as DeepSpeed's model_to_params walks them.
    modules = [v * h, t * h, 3 * h * h + qkv_bias, h * h + h, 4 * h * h + 4 * h, 4 * h * h + h, 2 * h]
    small = cfg.n_layer * sum(n for n in block_tensors if n < persistence_threshold) + sum(
        n for n in outer if n < persistence_threshold
    )
    decay = cfg.n_layer * 12 * h * h + (0 if cfg.tie_embeddings else v * h)
    return ParamCount(total=total, largest_layer=max(modules), small=small, groups=(decay, total - decay))


# ---------------------------------------------------------------------------------------------------
# Model states
# ---------------------------------------------------------------------------------------------------


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
    """The planner's model states: the ZeRO paper's terms plus DeepSpeed's extra copies (module docstring)."""
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
    groups = [min(g, DS_DEFAULT_SUB_GROUP) if stage == 3 else g for g in params.groups]
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
    the same arguments (ZeRO-3 with `zero_init=True`: ds_trainer builds ZeRO-3 models in zero.Init).
    DeepSpeed assumes 16-bit weights and has no NVMe variant (its CPU-offload figures are shown).
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
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
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
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
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


# ---------------------------------------------------------------------------------------------------
# Activations and buffers
# ---------------------------------------------------------------------------------------------------


def activation_memory(
    cfg: GPTConfig, micro_batch: int, context: int, dtype: str = "bf16", attention: str = "flash"
) -> Activations:
    """Korthikanti et al. 2022 per layer, adapted to our attention and dtype (see the module docstring)."""
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
    stage = int(zero.get("stage", 0))
    reduce = int(zero.get("reduce_bucket_size", DS_DEFAULT_BUCKET))
    if stage == 0:
        return min(params.total, DS_DDP_ALLREDUCE_BUCKET) * w if world > 1 else 0
    if stage in (1, 2):
        overlap = bool(zero.get("overlap_comm", False))
        contiguous = bool(zero.get("contiguous_gradients", True))
        allgather = int(zero.get("allgather_bucket_size", DS_DEFAULT_BUCKET))
        buckets = reduce * (2 if overlap else 1) if contiguous else 0
        return (buckets + min(allgather, params.total)) * w
    overlap = bool(zero.get("overlap_comm", True))
    prefetch = int(zero.get("stage3_prefetch_bucket_size", DS_DEFAULT_PREFETCH_BUCKET))
    return (reduce * (2 if overlap else 1) + prefetch + params.small) * w


# ---------------------------------------------------------------------------------------------------
# DeepSpeed JSON
# ---------------------------------------------------------------------------------------------------

CANDIDATES: tuple[tuple[str, Layout, bool], ...] = (
    ("zero0", Layout(0), False),
    ("zero1", Layout(1), False),
    ("zero2", Layout(2), False),
    ("zero0", Layout(0), True),
    ("zero1", Layout(1), True),
    ("zero2", Layout(2), True),
    ("zero3", Layout(3), False),
    ("zero3", Layout(3), True),
    ("zero2_offload_cpu", Layout(2, "cpu"), False),
    ("zero2_offload_cpu", Layout(2, "cpu"), True),
    ("zero3_offload_cpu", Layout(3, "cpu", "cpu"), False),
    ("zero3_offload_cpu", Layout(3, "cpu", "cpu"), True),
    ("zero3_offload_nvme", Layout(3, "nvme", "nvme"), False),
    ("zero3_offload_nvme", Layout(3, "nvme", "nvme"), True),
)
"""(ds_configs/ file, layout, activation checkpointing), cheapest first; see the module docstring."""


def _load_base(name: str) -> dict[str, Any]:
    return json.loads((DS_CONFIGS / f"{name}.json").read_text())


def layout_ds_config(layout: Layout) -> tuple[str, dict[str, Any]]:
    """The ds_configs/ file closest to `layout` and its JSON, offload sections adjusted to match."""
    exact = {c[1]: c[0] for c in CANDIDATES}
    if layout in exact:
        return exact[layout], _load_base(exact[layout])
    name = f"zero{layout.stage}"
    cfg = _load_base(name)
    zero = cfg["zero_optimization"]
    nvme = _load_base("zero3_offload_nvme")["zero_optimization"]
    for section, device in (
        ("offload_optimizer", layout.offload_optimizer),
        ("offload_param", layout.offload_params),
    ):
        if device == "cpu":
            zero[section] = {"device": "cpu", "pin_memory": True}
        elif device == "nvme":
            zero[section] = copy.deepcopy(nvme[section])
    return name, cfg


def suggested_ds_config(
    base: dict[str, Any],
    dtype: str,
    activation_checkpointing: bool,
    micro_batch: int,
    gradient_accumulation_steps: int | None = None,
) -> dict[str, Any]:
    """`base` (a ds_configs/ JSON) with the dtype, micro batch and checkpointing section of a plan.

    The micro batch is written as a number (the plan depends on it); gradient accumulation only when
    the micro batch was lowered, to keep the per-GPU batch; everything else stays "auto".
    """
    fp16_section = _load_base("zero1_fp16")["fp16"]
    out: dict[str, Any] = {}
    placed = False
    for key, value in base.items():
        if key in ("bf16", "bfloat16", "fp16"):
            if not placed:
                placed = True
                if dtype == "bf16":
                    out["bf16"] = {"enabled": True}
                elif dtype == "fp16":
                    out["fp16"] = copy.deepcopy(fp16_section)
            continue
        out[key] = copy.deepcopy(value)
    if not placed and dtype != "fp32":
        out["bf16" if dtype == "bf16" else "fp16"] = (
            {"enabled": True} if dtype == "bf16" else copy.deepcopy(fp16_section)
        )
    out["train_micro_batch_size_per_gpu"] = micro_batch
    if gradient_accumulation_steps is not None:
        out["gradient_accumulation_steps"] = gradient_accumulation_steps
    out.pop("activation_checkpointing", None)
    if activation_checkpointing:
        out["activation_checkpointing"] = copy.deepcopy(ACTIVATION_CHECKPOINTING_SECTION)
    return out


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------


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


def plan(
    model: GPTConfig | str,
    *,
    zero: int = 0,
    offload: str = "none",
    offload_params: bool | None = None,
    nodes: int = 1,
    gpus_per_node: int = 1,
    gpu_memory_gb: float = 80.0,
    micro_batch: int = 4,
    context: int | None = None,
    dtype: str = "bf16",
    mfu: float = 0.4,
    peak_tflops: float | None = None,
    tokens: int | None = None,
    tokens_per_param: float = TOKENS_PER_PARAM,
    cpu_memory_gb: float = DEFAULT_CPU_MEMORY_GB,
    nvme_gb: float = DEFAULT_NVME_GB,
    attention: str = "flash",
    ds_buffer_factor: float = 1.5,
) -> Plan:
    """Memory per GPU, compute budget and a fitting DeepSpeed JSON for `model` on nodes × gpus_per_node.

    `model` is a GPTConfig or a preset name. Memory sizes are in GiB (2**30 bytes). `offload` is where
    offloaded states go; `offload_params` (ZeRO-3 only) defaults to on whenever ZeRO-3 offloads.
    `peak_tflops` defaults by dtype (DEFAULT_PEAK_TFLOPS). `tokens` defaults to tokens_per_param ×
    parameters. Raises DsTrainerError on bad input; a model that fits nowhere is a Plan with
    `suggestion=None` and `no_fit_reason` set.
    """
    if isinstance(model, str):
        model_name = model
        cfg = model_config(model)
    else:
        cfg = model
        problems = cfg.problems()
        if problems:
            raise DsTrainerError("; ".join(problems))
        model_name = next((k for k, v in PRESETS.items() if v == cfg), "custom model")
    layout = _resolve_layout(zero, offload, offload_params)
    if dtype not in DTYPE_BYTES:
        raise DsTrainerError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if attention not in ATTENTION_MODES:
        raise DsTrainerError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node), ("micro_batch", micro_batch)):
        _check_positive(name, value)
    for name, value in (
        ("gpu_memory_gb", gpu_memory_gb),
        ("cpu_memory_gb", cpu_memory_gb),
        ("nvme_gb", nvme_gb),
        ("tokens_per_param", tokens_per_param),
    ):
        _check_positive(name, value, integer=False)
    if not isinstance(mfu, int | float) or not 0 < mfu <= 1:
        raise DsTrainerError(f"mfu must be in (0, 1], got {mfu!r}")
    if peak_tflops is None:
        peak_tflops = DEFAULT_PEAK_TFLOPS[dtype]
    _check_positive("peak_tflops", peak_tflops, integer=False)
    context = cfg.block_size if context is None else context
    _check_positive("context", context)
    if context > cfg.block_size:
        raise DsTrainerError(
            f"context {context} is longer than the model's block_size {cfg.block_size}; raise --block_size or lower --context"
        )
    if tokens is not None:
        _check_positive("tokens", tokens)

    world = nodes * gpus_per_node
    params = count_parameters(cfg)
    gpu_usable = int(gpu_memory_gb * GIB * (1 - MEMORY_MARGIN)) - GPU_FIXED_OVERHEAD
    cpu_usable = int(cpu_memory_gb * GIB * (1 - MEMORY_MARGIN))
    nvme_usable = int(nvme_gb * GIB * (1 - MEMORY_MARGIN))

    # The search below asks for the same layouts and micro batches many times: each figure once.
    @functools.cache
    def states_of(lay: Layout) -> ModelStates:
        return model_states(params, lay, dtype, nodes, gpus_per_node)

    @functools.cache
    def acts_of(micro: int) -> Activations:
        return activation_memory(cfg, micro, context, dtype, attention)

    def need(lay: Layout, ds_cfg: dict[str, Any], micro: int, ckpt: bool) -> MemoryNeed:
        return MemoryNeed(
            states=states_of(lay),
            buffers=buffer_bytes(ds_cfg, params, dtype, world),
            activations=acts_of(micro).total(ckpt),
            gpu_usable=gpu_usable,
            cpu_usable_per_node=cpu_usable,
            nvme_usable_per_node=nvme_usable,
        )

    _, requested_cfg = layout_ds_config(layout)
    bases = {name: _load_base(name) for name, _, _ in CANDIDATES}

    suggestion = None
    last = None
    for micro in sorted((d for d in range(1, micro_batch + 1) if micro_batch % d == 0), reverse=True):
        for base_name, lay, ckpt in CANDIDATES:
            base = bases[base_name]
            n = need(lay, base, micro, ckpt)
            last = (base_name, lay, ckpt, micro, n)
            if n.fits:
                gas = None if micro == micro_batch else micro_batch // micro
                suggestion = Suggestion(
                    base_name,
                    lay,
                    ckpt,
                    micro,
                    gas or 1,
                    n,
                    suggested_ds_config(base, dtype, ckpt, micro, gas),
                )
                break
        if suggestion:
            break
    no_fit_reason = None
    if suggestion is None:
        assert last is not None
        base_name, lay, ckpt, micro, n = last
        no_fit_reason = (
            f"no DeepSpeed config fits: even {lay.describe()} ({base_name}.json) with activation checkpointing at "
            f"micro batch {micro} falls short ({n.shortfall()}); add GPUs or nodes, use GPUs with more memory, "
            f"or plan a smaller model or context"
        )

    n_tokens = tokens if tokens is not None else int(round(tokens_per_param * params.total))
    return Plan(
        model=cfg,
        model_name=model_name,
        params=params,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        dtype=dtype,
        layout=layout,
        micro_batch=micro_batch,
        context=context,
        attention=attention,
        gpu_memory=int(gpu_memory_gb * GIB),
        zero_paper=zero_paper_states(params.total, layout, dtype, nodes, gpus_per_node),
        states=states_of(layout),
        deepspeed=deepspeed_estimate(params, layout, nodes, gpus_per_node, ds_buffer_factor),
        buffers=buffer_bytes(requested_cfg, params, dtype, world),
        activations=acts_of(micro_batch),
        need=need(layout, requested_cfg, micro_batch, False),
        need_checkpointed=need(layout, requested_cfg, micro_batch, True),
        compute=Compute(
            tokens=n_tokens,
            tokens_per_param=n_tokens / params.total,
            flops=6.0 * params.total * n_tokens,
            devices=world,
            peak_tflops=float(peak_tflops),
            mfu=float(mfu),
        ),
        suggestion=suggestion,
        no_fit_reason=no_fit_reason,
    )


# ---------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n < 1e9 else f"{n / 1e9:,.3f}B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _fits(n: MemoryNeed) -> str:
    return "fits" if n.fits else f"does NOT fit ({n.shortfall()})"


def format_plan(p: Plan) -> str:
    """The plan as the table launch/plan.py prints (GiB with two decimals)."""
    c = p.model
    lines = [
        f"model       {p.model_name}: {_millions(p.params.total)} parameters ({p.params.total:,}); "
        f"{c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, vocab {c.vocab_size}, block {c.block_size}; "
        f"largest layer {_millions(p.params.largest_layer)}",
        f"setup       {p.nodes} node(s) x {p.gpus_per_node} GPU(s) = {p.world_size} data-parallel ranks, "
        f"{gib(p.gpu_memory)} GiB each; {p.dtype}; {p.layout.describe()}; micro batch {p.micro_batch} x context "
        f"{p.context}",
        "",
        "model states per GPU (GiB)   ZeRO paper   planner   DeepSpeed estimator",
    ]
    ds = p.deepspeed
    rows = [
        ("parameters", p.zero_paper.params, p.states.params),
        ("gradients", p.zero_paper.grads, p.states.grads),
        ("optimizer states", p.zero_paper.optimizer, p.states.optimizer),
    ]
    for name, paper, ours in rows:
        lines.append(f"  {name:<26} {gib(paper):>10} {gib(ours):>9}")
    lines.append(
        f"  {'ZeRO-3 gathered module':<26} {'-':>10} {gib(p.states.working_set):>9}   (forward/backward)"
    )
    lines.append(f"  {'fp32 gradient copies':<26} {'-':>10} {gib(p.states.update):>9}   (optimizer step)")
    ds_gpu = gib(ds.gpu) if ds else "n/a (none for ZeRO-0/1)"
    lines.append(f"  {'peak on GPU':<26} {gib(p.zero_paper.gpu):>10} {gib(p.states.gpu):>9}   {ds_gpu}")
    if ds or p.states.cpu_per_node or p.states.nvme_per_node:
        ds_cpu = f"{gib(ds.cpu_per_node)} (x{ds.buffer_factor:g} buffer factor)" if ds else "n/a"
        if ds and p.layout.offload_optimizer == "none":
            ds_cpu += "; to load the model at start-up"
        lines.append(
            f"  {'CPU per node':<26} {gib(p.zero_paper.cpu_per_node):>10} {gib(p.states.cpu_per_node):>9}   {ds_cpu}"
        )
        if p.states.nvme_per_node:
            lines.append(
                f"  {'NVMe per node':<26} {gib(p.zero_paper.nvme_per_node):>10} {gib(p.states.nvme_per_node):>9}"
            )
    if ds:
        lines.append(f"  DeepSpeed: {ds.function}({ds.options})" + (f"; {ds.note}" if ds.note else ""))
    a = p.activations
    lines += [
        "",
        f"activations per GPU, micro batch {p.micro_batch} x context {p.context}, {p.attention} attention (GiB)",
        f"  {'':<26} {'no ckpt':>10} {'ckpt':>9}",
        f"  {'per layer':<26} {gib(a.per_layer):>10} {gib(a.block_input):>9}   (x {a.n_layer} layers)",
        f"  {'logits + loss backward':<26} {gib(a.logits + a.loss_backward):>10} {gib(a.logits + a.loss_backward):>9}",
        f"  {'total':<26} {gib(a.full):>10} {gib(a.checkpointed):>9}",
        "",
        f"fit on {gib(p.gpu_memory)} GiB ({gib(p.need.gpu_usable)} usable after {MEMORY_MARGIN:.0%} margin and "
        f"{gib(GPU_FIXED_OVERHEAD)} GiB fixed overhead)",
        f"  {'':<26} {'no ckpt':>10} {'ckpt':>9}",
        f"  {'model states held':<26} {gib(p.need.states.held):>10} {gib(p.need_checkpointed.states.held):>9}",
        f"  {'DeepSpeed buffers':<26} {gib(p.need.buffers):>10} {gib(p.need_checkpointed.buffers):>9}",
        f"  {'+ max of: activations':<26} {gib(p.need.activations + p.states.working_set):>10} "
        f"{gib(p.need_checkpointed.activations + p.states.working_set):>9}   (incl. ZeRO-3 gathered module)",
        f"  {'       or: update copies':<26} {gib(p.states.update):>10} {gib(p.states.update):>9}",
        f"  {'peak per GPU':<26} {gib(p.need.gpu):>10} {gib(p.need_checkpointed.gpu):>9}",
        f"  without checkpointing: {_fits(p.need)}",
        f"  with checkpointing:    {_fits(p.need_checkpointed)}",
        "",
    ]
    k = p.compute
    lines += [
        f"compute     {k.tokens / 1e9:,.2f}B tokens ({k.tokens_per_param:.1f} per parameter); "
        f"6 x N x D = {k.flops:.3e} FLOPs",
        f"            {k.devices} device(s) x {k.peak_tflops:g} TFLOP/s peak x MFU {k.mfu:g} -> {_duration(k.seconds)}",
        "",
    ]
    s = p.suggestion
    if s is None:
        lines.append(f"suggestion  {p.no_fit_reason}")
    else:
        batch = f"micro batch {s.micro_batch}"
        if s.gradient_accumulation_steps > 1:
            batch += f" x {s.gradient_accumulation_steps} accumulation steps (requested micro batch {p.micro_batch})"
        lines.append(
            f"suggestion  {s.base_file}.json: {s.layout.describe()}, activation checkpointing "
            f"{'on' if s.activation_checkpointing else 'off'}, {batch}; {gib(s.need.gpu)} GiB per GPU"
            + (f", {gib(s.need.states.cpu_per_node)} GiB CPU per node" if s.need.states.cpu_per_node else "")
            + (
                f", {gib(s.need.states.nvme_per_node)} GiB NVMe per node"
                if s.need.states.nvme_per_node
                else ""
            )
        )
        lines.append(json.dumps(s.config, indent=2))
    return "\n".join(lines)


def write_suggestion(p: Plan, path: str | Path) -> Path:
    """Write the suggested JSON to `path`; DsTrainerError when nothing fits or the path is not writable."""
    if p.suggestion is None:
        raise DsTrainerError(f"{p.no_fit_reason}; nothing written to {path}")
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(p.suggestion.config, indent=2) + "\n")
    except OSError as e:
        raise DsTrainerError(f"cannot write {path}: {e.strerror}") from None
    return out


# ---------------------------------------------------------------------------------------------------
# Measurement (tests and benchmarks/plan_vs_measured.py)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredStates:
    """Bytes a live DeepSpeed engine holds around its optimizer update, each storage counted once.

    Snapshots are taken during the last training step's `engine.step()` (so Adam's states exist and
    the gradients are reduced), at two kinds of moments: when the optimizer's flatten returns (ZeRO's `self.flatten`, FP16_Optimizer's
    `_flatten_dense_tensors`: the new flat gradient copy exists next to the buffer it was copied from)
    and on entry to the inner optimizer's `step` (one call per parameter group under ZeRO); the largest
    snapshot is kept. Which buffers count, in this order (a storage already counted is not counted again):

    - params: the module's parameters and the model-dtype flat buffers they are views of (ZeRO-1/2
      `bit16_groups_flat`, FP16_Optimizer `fp16_groups_flat`, ZeRO-3 `fp16_partitioned_groups_flat`,
      `lp_param_buffer`);
    - grads: `.grad` of the module's parameters, ZeRO's gradient buffers (`grads_in_partition`,
      `averaged_gradients`, ZeRO-3 `grad_partitions_flat_buffer`), the flatten's inputs and output at a
      flatten snapshot, and `.grad` of the tensors the inner optimizer steps (the flat fp32 gradient);
    - optimizer: the inner optimizer's own parameters when they are separate tensors (fp32 master
      partitions: `single_partition_of_fp32_groups`, `fp32_groups_flat`, `fp32_partitioned_groups_flat`)
      and every tensor in its `state` (exp_avg, exp_avg_sq, step).

    `buffers` are ZeRO's reduce-bucket buffers alive at that moment (not model states; the planner
    counts them under buffers). `live` is every tensor storage alive in the process (gc walk).

    Blind spot: in bf16/fp16 at ZeRO-1/2/3 the peak is inside `flatten(...).to(fp32)`, after the flatten
    returns and before the step, where no hook sees it; the snapshots then miss the model-dtype flat
    copy or the fp32 copy (the planner counts both). In fp32, and at ZeRO-0 in any dtype, nothing is missed.
    """

    params: int
    grads: int
    optimizer: int
    buffers: int
    live: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def _tensors(obj: Any) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for x in obj for t in _tensors(x)]
    return []


def _storage_bytes(tensors: list, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def measure_model_states(engine: Any, input_ids: Any, steps: int = 2) -> MeasuredStates:
    """Train `steps` steps on `input_ids` (targets = inputs); model states at the last update's peak."""
    import deepspeed.runtime.fp16.fused_optimizer as fused_optimizer

    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    snapshots: list[MeasuredStates] = []
    recording = [False]

    def attr(name: str) -> list:
        return _tensors(getattr(wrapper, name, None))

    def snapshot(extra_grads: list) -> None:
        if not recording[0]:
            return
        seen: set[int] = set()
        module_params = list(engine.module.parameters())
        inner_params = [q for g in inner.param_groups for q in g["params"]]
        params = _storage_bytes(
            module_params
            + attr("bit16_groups_flat")
            + attr("fp16_groups_flat")
            + attr("fp16_partitioned_groups_flat")
            + attr("lp_param_buffer"),
            seen,
        )
        grads = _storage_bytes(
            [q.grad for q in module_params]
            + attr("grads_in_partition")
            + attr("averaged_gradients")
            + attr("grad_partitions_flat_buffer")
            + extra_grads
            + [q.grad for q in inner_params],
            seen,
        )
        optimizer = _storage_bytes(
            inner_params
            + attr("single_partition_of_fp32_groups")
            + attr("fp32_groups_flat")
            + attr("fp32_partitioned_groups_flat")
            + _tensors(list(inner.state.values())),
            seen,
        )
        buckets = [getattr(b, "buffer", None) for b in getattr(wrapper, "ipg_buckets", {}).values()]
        buffers = _storage_bytes(_tensors(buckets), seen)
        snapshots.append(MeasuredStates(params, grads, optimizer, buffers, live_tensor_bytes()))

    def watched(fn: Any) -> Any:
        def flatten(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            out = fn(tensors, *args, **kwargs)
            snapshot(_tensors(list(tensors)) + [out])
            return out

        return flatten

    def step(*args: Any, **kwargs: Any) -> Any:
        snapshot([])
        return original_step(*args, **kwargs)

    original_step = inner.step
    original_flatten = fused_optimizer._flatten_dense_tensors
    wrapper_flatten = vars(wrapper).get("flatten")  # ZeRO optimizers keep it as an instance attribute
    inner.step = step
    fused_optimizer._flatten_dense_tensors = watched(original_flatten)
    if wrapper_flatten is not None:
        wrapper.flatten = watched(wrapper_flatten)
    try:
        for i in range(steps):
            loss = engine(input_ids, input_ids)
            engine.backward(loss)  # gradient reduction flattens buckets here: not the update
            recording[0] = i == steps - 1
            engine.step()
            recording[0] = False
    finally:
        del inner.step  # back to the class's method
        fused_optimizer._flatten_dense_tensors = original_flatten
        if wrapper_flatten is not None:
            wrapper.flatten = wrapper_flatten
    if not snapshots:
        raise RuntimeError("the optimizer never stepped; was the step skipped (overflow)?")
    return max(snapshots, key=lambda m: m.total)


def release_engine(engine: Any) -> None:
    """Empty a measured engine's big tensors: DeepSpeed's gradient hooks keep an engine alive after `del`."""
    import torch

    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    inner.state.clear()
    for group in inner.param_groups:
        for q in group["params"]:
            q.data = torch.empty(0)
            q.grad = None
    for name in (
        "bit16_groups_flat",
        "single_partition_of_fp32_groups",
        "fp16_groups_flat",
        "fp32_groups_flat",
        "fp16_partitioned_groups_flat",
        "fp32_partitioned_groups_flat",
    ):
        if hasattr(wrapper, name):
            setattr(wrapper, name, [])
    if isinstance(getattr(wrapper, "grad_partitions_flat_buffer", None), torch.Tensor):
        wrapper.grad_partitions_flat_buffer = torch.empty(0)
    for q in engine.module.parameters():
        q.data = torch.empty(0)
        q.grad = None
        if hasattr(q, "ds_tensor"):  # ZeRO-3: this rank's partition, a view of the flat buffer
            q.ds_tensor.data = torch.empty(0)
    gc.collect()


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once)."""
    import torch

    with warnings.catch_warnings():  # isinstance() on some module proxies warns of deprecations
        warnings.simplefilter("ignore")
        alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    sizes = {}
    for t in alive:
        if t.device.type != "meta":
            s = t.untyped_storage()
            sizes[s.data_ptr()] = s.nbytes()
    return sum(sizes.values())
