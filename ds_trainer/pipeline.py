"""The GPT as a DeepSpeed pipeline: the same modules and weights as ds_trainer.model, cut into stages.

Layers: embedding (token + position), the blocks, the final LayerNorm, the LM head. With tied
embeddings the head is the embedding layer again (a TiedLayerSpec), so the first and last stage
share that weight and DeepSpeed all-reduces its gradient between them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec

from ds_trainer import ds_internals
from ds_trainer.errors import DsTrainerError
from ds_trainer.model import Block, GPTConfig, init_weights


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.size(1), device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(pos))


def _tied_head(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, embedding.wte.weight)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


class LayerMap:
    """Where the plain GPT's modules sit in the pipeline's layer list: the embedding (0), blocks 1..n_layer,
    the final LayerNorm (n_layer + 1) and the head (n_layer + 2). Partitions, initialisation and export
    all read it from here."""

    EMBEDDING = 0

    def __init__(self, n_layer: int) -> None:
        self.n_layer = n_layer
        self.ln_f = n_layer + 1
        self.head = n_layer + 2
        self.count = n_layer + 3

    def is_block(self, idx: int) -> bool:
        return 1 <= idx <= self.n_layer

    def gpt_name(self, idx: int) -> str:
        """The plain GPT's module name for layer `idx` ("" for the embedding, whose names are top-level)."""
        if idx == self.EMBEDDING:
            return ""
        if self.is_block(idx):
            return f"h.{idx - 1}"
        return "ln_f" if idx == self.ln_f else "lm_head"

    def describe(self, idx: int) -> str:
        if idx == self.EMBEDDING:
            return "embedding"
        if self.is_block(idx):
            return f"block {idx}"
        return "final LayerNorm" if idx == self.ln_f else "head"


def parse_partition(method: str, n_layer: int, stages: int) -> str | list[int]:
    """ "parameters", "uniform", or "blocks:a,b,…" (transformer blocks per stage) as layer boundaries."""
    if method in ("parameters", "uniform"):
        return method
    if method.startswith("blocks:"):
        try:
            counts = [int(c) for c in method[len("blocks:") :].split(",")]
        except ValueError:
            counts = []
        if len(counts) != stages or sum(counts) != n_layer or min(counts, default=0) < 1:
            raise DsTrainerError(
                f"pipeline.partition {method!r} must list {stages} positive block counts summing to {n_layer} "
                f"(e.g. blocks:{','.join(str(n_layer // stages + (i < n_layer % stages)) for i in range(stages))})"
            )
        layers = LayerMap(n_layer)
        bounds, acc = [layers.EMBEDDING], layers.EMBEDDING + 1  # the embedding goes with the first stage
        for c in counts[:-1]:
            acc += c
            bounds.append(acc)
        return bounds + [layers.count]  # the last stage also takes the final LayerNorm and the head
    raise DsTrainerError(
        f"pipeline.partition {method!r} is unknown; use parameters, uniform or blocks:a,b,..."
    )


def stage_without_blocks(parts: list[int], n_layer: int, partition: str) -> str | None:
    """A stage that holds no transformer block, as a problem to report (None when every stage has one).

    Such a stage (e.g. only the final LayerNorm and the head) has no weight-decayed parameters, so
    DeepSpeed drops that parameter group there; ZeRO then runs one gradient-norm all-reduce per group
    and the stages wait on each other forever.
    """
    layers = LayerMap(n_layer)
    for stage, (start, stop) in enumerate(zip(parts[:-1], parts[1:], strict=True)):
        if not any(layers.is_block(i) for i in range(start, stop)):
            held = ", ".join(layers.describe(i) for i in range(start, min(stop, layers.count))) or "nothing"
            stages = len(parts) - 1
            even = ",".join(str(n_layer // stages + (i < n_layer % stages)) for i in range(stages))
            return (
                f"pipeline.partition {partition!r} gives stage {stage} no transformer block ({held}); every stage "
                f"needs one: use pipeline.partition blocks:{even}, or fewer pipeline.stages"
            )
    return None


class GPTPipeline(ds_internals.pipeline_module_with_bounds()):
    """The GPT as DeepSpeed pipeline layers (LayerMap's order), partitioned as pipeline.partition says,
    initialised like the plain GPT."""

    def __init__(self, cfg: GPTConfig, stages: int, partition: str, checkpoint_blocks: bool) -> None:
        method = parse_partition(partition, cfg.n_layer, stages)
        if isinstance(method, list):
            self.explicit_bounds, method = method, "uniform"
        if cfg.tie_embeddings:
            first = TiedLayerSpec("embed", EmbeddingPipe, cfg, tied_weight_attr="wte.weight")
            last = TiedLayerSpec(
                "embed", EmbeddingPipe, cfg, forward_fn=_tied_head, tied_weight_attr="wte.weight"
            )
        else:
            first = LayerSpec(EmbeddingPipe, cfg)
            last = LayerSpec(nn.Linear, cfg.n_embd, cfg.vocab_size, bias=False)
        layers = [
            first,
            *(LayerSpec(Block, cfg) for _ in range(cfg.n_layer)),
            LayerSpec(nn.LayerNorm, cfg.n_embd),
            last,
        ]
        super().__init__(
            layers=layers,
            num_stages=stages,
            loss_fn=lm_loss,
            partition_method=method,
            activation_checkpoint_interval=1 if checkpoint_blocks else 0,
            checkpointable_layers=["Block"],
        )
        # Every rank knows every stage's bounds, so all of them stop here with the same message.
        if problem := stage_without_blocks(self.parts, cfg.n_layer, partition):
            raise DsTrainerError(problem)
        self._init_like_gpt(cfg)

    def _init_like_gpt(self, cfg: GPTConfig) -> None:
        """Give each local layer the weights the plain GPT draws for the module of the same name."""
        for key, module in self.tied_modules.items():
            if key == "embed":
                init_weights(module, "", cfg)
        layers = LayerMap(cfg.n_layer)
        for idx in self.local_layer_indices():
            module = getattr(self, str(idx), None)
            if module is not None:
                init_weights(module, layers.gpt_name(idx), cfg)


def train_step(
    engine: deepspeed.PipelineEngine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """One optimizer step; DeepSpeed runs the 1F1B schedule and returns the mean loss on every stage."""
    return engine.train_batch(iter(micro_batches))


def eval_loss(
    engine: deepspeed.PipelineEngine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    return engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches))


@torch.no_grad()
def generate(
    engine: deepspeed.PipelineEngine,
    prompt: list[int],
    max_new_tokens: int,
    context_length: int,
    micro_batch_size: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    pad_id: int,
) -> list[int]:
    """Sampling through the stages. Every input has the training shape (micro batch × context, right-padded),
    so the pipeline's cached activation shapes stay valid; causal attention makes padding harmless.
    The last stage picks the token (`pick(logits)`, e.g. model.sample_token) and broadcasts each token to the other stages of its pipeline. The loss
    DeepSpeed computes on the way (against the input as dummy targets) is discarded: its evaluation
    keeps a running loss total that logits cannot be added to.
    """
    device = next(engine.module.parameters()).device
    ids = list(prompt)
    last_stage = engine.grid.stage_to_global(stage_id=engine.num_stages - 1)
    for _ in range(max_new_tokens):
        window = ids[-context_length:]
        x = torch.full((micro_batch_size, context_length), pad_id, dtype=torch.long)
        x[:, : len(window)] = torch.tensor(window)
        _, logits = engine.eval_batch(
            _repeat((x, x.clone())),
            return_logits=True,
            bcast_loss=False,
            num_micro_batches=1,
        )
        token = torch.zeros(1, dtype=torch.long, device=device)
        if engine.is_last_stage():
            token[0] = pick(logits[0, len(window) - 1])
        dist.broadcast(token, src=last_stage, group=engine.grid.get_pipe_parallel_group())
        ids.append(int(token))
    return ids


def _repeat(item: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield item
