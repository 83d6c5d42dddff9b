"""The planner's typed results: parameter counts, layouts, memory figures, compute budget and the plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ds_trainer.errors import join_problems
from ds_trainer.model import GPTConfig
from ds_trainer.planning.constants import gib


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
    """Activation bytes of one micro-batch on one GPU; docs/planning.md explains the formula."""

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
        return join_problems(out)


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
