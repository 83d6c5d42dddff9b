"""GPT-2, written out: embeddings, pre-LayerNorm blocks, tied LM head, generation."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_trainer.errors import DsTrainerError, join_problems

GPT2_VOCAB_SIZE = 50257


@dataclass(frozen=True)
class GPTConfig:
    """Shape and regularisation of a GPT model."""

    vocab_size: int = GPT2_VOCAB_SIZE
    """Number of token embeddings (50257 for the GPT-2 tokenizer)."""
    block_size: int = 1024
    """Longest sequence the learned position embedding covers."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches."""
    qkv_bias: bool = True
    """Bias in the fused query/key/value projection (GPT-2 has one)."""
    tie_embeddings: bool = True
    """Share the LM head's weight with the token embedding, as GPT-2 does."""
    init: str = "gpt2"
    """Initial weights: "gpt2" (normal, std 0.02, residual projections scaled by 1/sqrt(2 n_layer)) or
    "torch" (each module's PyTorch default, as the from-scratch books' model starts)."""

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> GPTConfig:
        if name not in PRESETS:
            raise DsTrainerError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def problems(self) -> list[str]:
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd") and v < 1:
                out.append(f"model.{f.name} must be >= 1, got {v}")
        if self.n_head >= 1 and self.n_embd % self.n_head:
            out.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INIT_SCHEMES:
            out.append(f"model.init {self.init!r} is unknown; choose one of {', '.join(INIT_SCHEMES)}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, GPTConfig] = {
    # Small enough for a 2-core CPU: tests and the built-in default run.
    "gpt2-tiny": GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
}


INIT_SCHEMES = ("gpt2", "torch")


def init_weights(root: nn.Module, prefix: str, config: GPTConfig, skip: tuple[nn.Module, ...] = ()) -> None:
    """The initial weights of config.init, drawn per module from a generator keyed by the module's name and
    torch's seed.

    Keying by name (wte, h.3.mlp.c_fc, ...) gives a module the same weights whoever builds it: the
    whole model, one pipeline stage, or every rank under ZeRO-3 (where DeepSpeed gathers each module's
    parameters around `apply`). Values are drawn on the CPU whatever the device (zero.Init makes tensors
    on the GPU unless told otherwise), so every layout starts from the same weights.
    """
    base = torch.initial_seed()
    names = {id(m): name for name, m in root.named_modules(prefix=prefix)}
    draw = _gpt2_init if config.init == "gpt2" else _torch_init

    def init(module: nn.Module) -> None:
        if module in skip or not isinstance(module, nn.Linear | nn.Embedding) or module.weight.is_meta:
            return  # meta tensors (shape-only models for planning) hold no values to draw
        key = hashlib.blake2b(f"{base}:{names[id(module)]}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        weight, bias = draw(module, config.n_layer, gen)
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)

    root.apply(init)


def _gpt2_init(
    module: nn.Module, n_layer: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPT-2's: normal(0, 0.02) weights, zero biases."""
    std = 0.02
    # GPT-2 scales the projections that write into the residual stream so that its variance does
    # not grow with depth (two such writes per block).
    if getattr(module, "is_residual_projection", False):
        std = 0.02 / math.sqrt(2 * n_layer)
    weight = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    has_bias = isinstance(module, nn.Linear) and module.bias is not None
    return weight, torch.zeros(module.bias.shape) if has_bias else None


def _torch_init(
    module: nn.Module, n_layer: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch's defaults (reset_parameters): Embedding normal(0, 1); Linear weight and bias uniform in
    ±1/sqrt(fan_in), which is what kaiming_uniform_(a=sqrt(5)) gives the weight."""
    if isinstance(module, nn.Embedding):
        return torch.empty(module.weight.shape).normal_(0.0, 1.0, generator=gen), None
    bound = 1.0 / math.sqrt(module.in_features)
    weight = torch.empty(module.weight.shape).uniform_(-bound, bound, generator=gen)
    bias = (
        None if module.bias is None else torch.empty(module.bias.shape).uniform_(-bound, bound, generator=gen)
    )
    return weight, bias


def parameter_sizes(cfg: GPTConfig) -> tuple[list[int], list[int]]:
    """Element counts of ds_trainer.model.GPT's tensors, each tied tensor once: (one block's, those outside
    the blocks). The tests check them against the model.

    Per block: LayerNorms 2·2h, c_attn 3h² (+3h bias), attn c_proj h² + h, c_fc 4h² + 4h, mlp c_proj
    4h² + h; outside: token and position embeddings, the final LayerNorm and, untied, the LM head.
    """
    h, v, t = cfg.n_embd, cfg.vocab_size, cfg.block_size
    qkv_bias = [3 * h] if cfg.qkv_bias else []
    block = [h, h, 3 * h * h, *qkv_bias, h * h, h, h, h, 4 * h * h, 4 * h, 4 * h * h, h]
    return block, [v * h, t * h, h, h] + ([] if cfg.tie_embeddings else [v * h])


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        # GPT-2 used the tanh approximation of GELU; matching it keeps HF weights interchangeable.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2. `model(input_ids)` gives logits (batch, time, vocab); `model(input_ids, targets)` the mean loss."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        problems = config.problems()
        if problems:
            raise DsTrainerError(join_problems(problems))
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.checkpoint_fn: Callable | None = None
        """Set (e.g. to deepspeed.checkpointing.checkpoint) to recompute each block in backward."""
        init_weights(self, "", config, skip=(self.lm_head,) if config.tie_embeddings else ())

    def num_parameters(self, exclude_position_embedding: bool = False) -> int:
        # Under ZeRO-3 a parameter's own tensor is empty; ds_numel keeps its full size.
        n = sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
        wpe = self.wpe.weight
        return n - getattr(wpe, "ds_numel", wpe.numel()) if exclude_position_embedding else n

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.size(1)
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for block in self.h:
            x = self.checkpoint_fn(block, x) if self.checkpoint_fn and self.training else block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        # The loss is taken in fp32 whatever the compute dtype: bf16 log-softmax over 50k classes is lossy.
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after `input_ids` (batch, time); temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            context = input_ids[:, -self.config.block_size :]
            next_id = sample_token(self(context)[:, -1, :], temperature, top_k, generator)
            input_ids = torch.cat([input_ids, next_id.unsqueeze(-1)], dim=1)
        return input_ids


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token for each row of `logits` (..., vocab): greedy at temperature 0, else drawn from
    softmax(logits / temperature) over the `top_k` most likely tokens (all when top_k is None or 0)."""
    row = logits.float()
    if temperature <= 0:
        return row.argmax(dim=-1)
    row = row / temperature
    if top_k:
        kth = torch.topk(row, min(top_k, row.size(-1))).values[..., -1:]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = F.softmax(row, dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator).view(row.shape[:-1])
