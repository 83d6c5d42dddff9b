"""The model being planned: a checked GPTConfig from a preset or dimensions, and its exact parameter count."""

from __future__ import annotations

from ds_trainer.errors import DsTrainerError, join_problems
from ds_trainer.model import PRESETS, GPTConfig, parameter_sizes
from ds_trainer.offload import DS_PERSISTENCE_THRESHOLD
from ds_trainer.planning.figures import ParamCount


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
        raise DsTrainerError(join_problems(problems))
    return cfg


def count_parameters(cfg: GPTConfig, persistence_threshold: int = DS_PERSISTENCE_THRESHOLD) -> ParamCount:
    """Exact parameter count of ds_trainer.model.GPT for `cfg` (the tests check it against the model)."""
    h, v, t = cfg.n_embd, cfg.vocab_size, cfg.block_size
    qkv_bias = 3 * h if cfg.qkv_bias else 0
    block_tensors, outer = parameter_sizes(cfg)
    total = cfg.n_layer * sum(block_tensors) + sum(outer)
    # Modules and their own parameters, as DeepSpeed's model_to_params walks them.
    modules = [v * h, t * h, 3 * h * h + qkv_bias, h * h + h, 4 * h * h + 4 * h, 4 * h * h + h, 2 * h]
    small = cfg.n_layer * sum(n for n in block_tensors if n < persistence_threshold) + sum(
        n for n in outer if n < persistence_threshold
    )
    decay = cfg.n_layer * 12 * h * h + (0 if cfg.tie_embeddings else v * h)
    return ParamCount(total=total, largest_layer=max(modules), small=small, groups=(decay, total - decay))
