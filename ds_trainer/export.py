"""Export a checkpoint: consolidated fp32 weights (safetensors + our config) and a Hugging Face GPT-2 folder.

Works from any layout the trainer writes: ZeRO-0 (the module file), ZeRO-1/2/3 (fp32 master
partitions gathered by DeepSpeed's zero_to_fp32) and pipeline stages (one file per layer; these hold
the training dtype, so a bf16 pipeline run exports its bf16 weights widened to fp32). Files are
memory-mapped where torch allows, so the module weights are not read twice into memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ds_trainer.checkpoint.files import LATEST, latest_tag
from ds_trainer.config import load_run_config
from ds_trainer.ds_validate import zero_stage
from ds_trainer.errors import DsTrainerError
from ds_trainer.model import GPTConfig

# GPT-2's Conv1D layers store (in, out); ours are nn.Linear (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def checkpoint_folder(run_dir: str | Path, tag: str | None) -> Path:
    run_dir = Path(run_dir)
    if tag is None:
        tag = latest_tag(run_dir)
        if tag is None:
            raise DsTrainerError(f"{run_dir}: no `{LATEST}` file; pass --tag with a checkpoint folder name")
    folder = run_dir / tag
    if not (folder / "run_config.json").is_file():
        raise DsTrainerError(f"{folder}: not a ds_trainer checkpoint (no run_config.json)")
    return folder


def _pipeline_state(folder: Path, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    from ds_trainer.pipeline import LayerMap  # imports deepspeed.pipe: only for pipeline checkpoints

    layers, state = LayerMap(cfg.n_layer), {}
    for f in sorted(folder.glob("layer_*-model_states.pt")):
        idx = int(f.name[len("layer_") : f.name.index("-")])
        layer = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        prefix = f"{layers.gpt_name(idx)}." if idx != layers.EMBEDDING else ""
        state.update({prefix + k: v for k, v in layer.items()})
    return state


def consolidated_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """fp32 weights under ds_trainer.model.GPT's names, and the model's config."""
    run = load_run_config(str(folder / "run_config.json"))
    cfg = run.gpt_config()
    ds = json.loads((folder / "ds_config.json").read_text())
    stage = zero_stage(ds)
    if any(folder.glob("layer_*-model_states.pt")):
        state = _pipeline_state(folder, cfg)
    elif stage == 0:
        state = torch.load(
            folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False, mmap=True
        )["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    state = {k: v.float().contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight
    return state, cfg


def to_huggingface(state: dict[str, torch.Tensor], cfg: GPTConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict and config.json of transformers.GPT2LMHeadModel holding the same model."""
    out = {}
    for k, v in state.items():
        name = "lm_head.weight" if k == "lm_head.weight" else f"transformer.{k}"
        out[name] = v.t().contiguous() if k.endswith(_CONV1D) else v
    if not cfg.qkv_bias:  # GPT-2 always has this bias; zeros are the same model
        for i in range(cfg.n_layer):
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.n_embd)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }
    return out, hf_config


# Hugging Face GPT-2's attention-mask buffers, which older transformers saved with the weights: not parameters.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def hf_name_to_ours(hf_name: str) -> str | None:
    """Our GPT's name for a tensor of transformers' GPT2LMHeadModel (or of GPT2Model, whose names have no
    `transformer.` prefix, as the original GPT-2 files on the Hub); None for a mask buffer."""
    if hf_name.endswith(_HF_BUFFERS):
        return None
    return hf_name.removeprefix("transformer.")


def from_huggingface(hf_state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """to_huggingface's inverse: a GPT2LMHeadModel state dict (any subset of it) under our names and layout.

    The tied head (`lm_head.weight`, which a file may or may not hold) is left to wte.weight. GPT-2 always
    has the qkv bias: without model.qkv_bias, zeros are the same model and are dropped, anything else is
    an error. Meta tensors (shapes only) pass that check unread.
    """
    state, nonzero = {}, []
    for k, v in hf_state.items():
        name = hf_name_to_ours(k)
        if name is None or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        if not cfg.qkv_bias and name.endswith("attn.c_attn.bias"):
            if not v.is_meta and bool(v.count_nonzero()):
                nonzero.append(k)
            continue
        state[name] = v.t().contiguous() if name.endswith(_CONV1D) else v
    if nonzero:
        raise DsTrainerError(
            f"{', '.join(nonzero)} {'is' if len(nonzero) == 1 else 'are'} not zero, but model.qkv_bias is "
            "false: set model.qkv_bias true to keep the bias"
        )
    return state


def export(run_dir: str | Path, out: str | Path, tag: str | None = None) -> dict[str, Path]:
    """Write OUT/model.safetensors + OUT/config.json (ours) and OUT/hf/ (Hugging Face GPT-2)."""
    folder = checkpoint_folder(run_dir, tag)
    state, cfg = consolidated_state_dict(folder)
    out = Path(out)
    (out / "hf").mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": str(folder)})
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    hf_state, hf_config = to_huggingface(state, cfg)
    if cfg.tie_embeddings:  # safetensors stores no shared tensors; transformers re-ties from the config
        hf_state.pop("lm_head.weight")
    save_file(hf_state, str(out / "hf" / "model.safetensors"), metadata={"format": "pt"})
    (out / "hf" / "config.json").write_text(json.dumps(hf_config, indent=2))
    return {"weights": out / "model.safetensors", "config": out / "config.json", "huggingface": out / "hf"}
