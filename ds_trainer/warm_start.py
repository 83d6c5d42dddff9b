"""Warm start (model.init_from): a model's initial weights from a Hugging Face GPT-2 folder or from the
model.safetensors that launch/export.py writes.

`init_from_problems` checks the weights against the configured model from the files' headers (before
any process group, so every rank stops with the same message); `load_initial_weights` copies them into
the model `build_model` returned, before deepspeed.initialize: ZeRO-1/2 take their fp32 master copies
there, so weights changed afterwards would be lost at the first step.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.nn as nn

from ds_trainer.errors import DsTrainerError, join_problems
from ds_trainer.export import from_huggingface, hf_name_to_ours, to_huggingface
from ds_trainer.model import GPT, GPTConfig

KEY = "model.init_from"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WHAT = (
    "give a Hugging Face GPT-2 folder (config.json with model.safetensors or pytorch_model.bin) or a "
    "model.safetensors from launch/export.py"
)
# Enough tensors named for a user to see the pattern: a size that differs makes every tensor differ.
MAX_LISTED = 3

# What transformers' GPT2Config assumes for a key its config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "vocab_size": 50257,
    "n_positions": 1024,
    "tie_word_embeddings": True,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}
# HF config key → our run-config key, for the sizes both have.
_HF_SIZES = {
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "vocab_size": "vocab_size",
    "n_positions": "block_size",
}
# The settings of our own export's config.json that the tensors' shapes do not all show (n_head).
_OUR_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "qkv_bias", "tie_embeddings")
# GELU's tanh approximation under each name transformers gives it: the only activation our MLP has.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass(frozen=True)
class Source:
    """The weights file model.init_from names, how its tensors are named, and the config.json beside it."""

    weights: Path
    huggingface: bool
    """transformers' names and Conv1D (in, out) layout; else ours (ds_trainer.model.GPT's state dict)."""
    config: dict[str, Any] | None


class WeightsFile:
    """Names, shapes and tensors of a .safetensors or .bin file, one tensor read at a time (safetensors) or
    memory-mapped (.bin): a rank never holds the whole file in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stack = ExitStack()
        self._safetensors: Any = None
        self._state: dict[str, torch.Tensor] = {}

    def __enter__(self) -> WeightsFile:
        try:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                self._safetensors = self._stack.enter_context(safe_open(str(self.path), framework="pt"))
            else:
                self._state = _state_dict(
                    torch.load(self.path, mmap=True, weights_only=True, map_location="cpu")
                )
        except Exception as e:  # any reader's error: a corrupt or foreign file is the user's to fix
            self._stack.close()
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DsTrainerError(f"{KEY} {self.path}: cannot be read ({first_line}): {WHAT}") from e
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._safetensors is not None:
            f = self._safetensors
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return {k: tuple(v.shape) for k, v in self._state.items()}

    def tensor(self, name: str) -> torch.Tensor:
        if self._safetensors is not None:
            return self._safetensors.get_tensor(name)
        return self._state[name]


def _state_dict(loaded: object) -> dict[str, torch.Tensor]:
    """`loaded` if it is a state dict (a .bin could hold anything torch pickles, e.g. a whole checkpoint)."""
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError("not a state dict of tensors")
    return loaded


def locate(path: str) -> Source:
    """The weights file at `path` (a folder or the file itself) and its naming; DsTrainerError if none."""
    p = Path(path)
    if p.is_dir():
        weights = next((p / f for f in WEIGHT_FILES if (p / f).is_file()), None)
        if weights is None:
            why = f"has neither {' nor '.join(WEIGHT_FILES)}"
            if any(p.glob("*.index.json")):
                why = "holds a sharded checkpoint (*.index.json), which is not supported"
            raise DsTrainerError(f"{KEY} {path}: the folder {why}: {WHAT}")
    elif p.is_file():
        if p.suffix not in (".safetensors", ".bin"):
            raise DsTrainerError(f"{KEY} {path}: not a .safetensors or .bin weights file: {WHAT}")
        weights = p
    else:
        raise DsTrainerError(f"{KEY} {path}: no such file or folder: {WHAT}")
    config = _read_config(weights.parent / "config.json", path)
    if config is not None:
        huggingface = "model_type" in config or "n_positions" in config  # ours has block_size instead
    else:
        with WeightsFile(weights) as f:
            huggingface = any(k.startswith("transformer.") for k in f.shapes())
    return Source(weights, huggingface, config)


def _read_config(file: Path, path: str) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DsTrainerError(f"{KEY} {path}: {file} is not valid JSON ({e}): fix or remove it") from e
    if not isinstance(config, dict):
        raise DsTrainerError(f"{KEY} {path}: {file} is not a JSON object: fix or remove it")
    return config


def init_from_problems(path: str, config: GPTConfig) -> list[str]:
    """What keeps the weights at `path` from initialising a model of `config`, one line each (empty: none).

    Reads config.json and the weights' headers (and, without model.qkv_bias, the small qkv biases that
    must be zero); needs no process group.
    """
    try:
        source = locate(path)
        if (wrong_model := _model_type_problem(source, path)) is not None:
            return [wrong_model]  # another architecture: its tensors would only add noise
        with WeightsFile(source.weights) as f:
            return _config_problems(source, config, path) + _tensor_problems(source, f, config, path)
    except DsTrainerError as e:
        return [str(e)]


def _model_type_problem(source: Source, path: str) -> str | None:
    model_type = (source.config or {}).get("model_type", "gpt2") if source.huggingface else "gpt2"
    if model_type == "gpt2":
        return None
    return f"{KEY} {path}: config.json describes a {model_type!r} model, not GPT-2: {WHAT}"


def _config_problems(source: Source, cfg: GPTConfig, path: str) -> list[str]:
    """The run's model against config.json: sizes the run must take over, settings our GPT cannot follow."""
    if source.config is None:
        return []
    if not source.huggingface:
        return [
            f"{KEY} {path}: its config.json has {k} {source.config[k]}, the run's model.{k} is "
            f"{getattr(cfg, k)}: set model.{k} {source.config[k]}"
            for k in _OUR_KEYS
            if k in source.config and source.config[k] != getattr(cfg, k)
        ]
    hf = {**_HF_DEFAULTS, **source.config}
    out = [
        f"{KEY} {path}: its config.json has {hf_key} {hf[hf_key]}, the run's model.{key} is {getattr(cfg, key)}: "
        f"set model.{key} {hf[hf_key]}"
        for hf_key, key in _HF_SIZES.items()
        if hf[hf_key] != getattr(cfg, key)
    ]
    if bool(hf["tie_word_embeddings"]) != cfg.tie_embeddings:
        tie = str(bool(hf["tie_word_embeddings"])).lower()
        out.append(
            f"{KEY} {path}: its config.json has tie_word_embeddings {tie}, the run's model.tie_embeddings is "
            f"{str(cfg.tie_embeddings).lower()}: set model.tie_embeddings {tie}"
        )
    unsupported = {
        "activation_function": hf["activation_function"] not in _TANH_GELU,
        "layer_norm_epsilon": hf["layer_norm_epsilon"] != 1e-5,
        "scale_attn_weights": not hf["scale_attn_weights"],
        "scale_attn_by_inverse_layer_idx": bool(hf["scale_attn_by_inverse_layer_idx"]),
    }
    out += [
        f"{KEY} {path}: its config.json has {k} {hf[k]!r}, which ds_trainer's GPT does not implement (it is "
        f"GPT-2 as published: tanh GELU, LayerNorm eps 1e-5, attention scaled by 1/sqrt(head size)); "
        "use weights of such a model"
        for k, bad in unsupported.items()
        if bad
    ]
    return out


def _expected_shapes(source: Source, cfg: GPTConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The shape of every tensor the model needs, under the file's names and layout; and the names that may
    be absent (a tied head, which files often leave out)."""
    with torch.device("meta"):  # shapes only, at any size
        state = dict(GPT(cfg).named_parameters())  # a tied head is named once, as wte.weight
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    if source.huggingface:
        state, _ = to_huggingface(state, cfg)
    optional = {k for k in state if k.endswith("lm_head.weight")} if cfg.tie_embeddings else set()
    return {k: tuple(v.shape) for k, v in state.items()}, optional


def _canonical(name: str, source: Source) -> str | None:
    """The name `to_huggingface` gives a file's tensor (GPT2Model files lack the `transformer.` prefix);
    None for HF's mask buffers."""
    if not source.huggingface:
        return name
    if hf_name_to_ours(name) is None:
        return None
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def _tensor_problems(source: Source, f: WeightsFile, cfg: GPTConfig, path: str) -> list[str]:
    expected, optional = _expected_shapes(source, cfg)
    found = {c: (k, shape) for k, shape in f.shapes().items() if (c := _canonical(k, source)) is not None}
    out = []
    # In the model's order (embeddings first, then block by block), which is also the order of the sizes.
    wrong = [
        (found[c][0], found[c][1], need) for c, need in expected.items() if c in found and found[c][1] != need
    ]
    for name, shape, need in wrong[:MAX_LISTED]:
        out.append(
            f"{KEY} {path}: {name} has shape {shape} but the model ({_sizes_behind(name, cfg)}) needs {need}: "
            "set the model's sizes to the weights' or use weights of this shape"
        )
    if len(wrong) > MAX_LISTED:
        out.append(
            f"{KEY} {path}: {len(wrong) - MAX_LISTED} more tensors have another shape than the model's"
        )
    missing = sorted(set(expected) - set(found) - optional)
    if missing:
        out.append(
            f"{KEY} {path}: lacks {_listing(missing)}, which the model has: use weights of the configured "
            "model (model.n_layer, model.tie_embeddings, model.qkv_bias) or configure the model as theirs"
        )
    extra = sorted(k for c, (k, _) in found.items() if c not in expected)
    if extra:
        out.append(
            f"{KEY} {path}: holds {_listing(extra)}, which the model does not have: use weights of the "
            "configured model (model.n_layer, model.tie_embeddings, model.qkv_bias) or configure the model as theirs"
        )
    if source.huggingface and not cfg.qkv_bias:  # zeros are the same model; read them, they are small
        biases = {k: f.tensor(k) for c, (k, _) in found.items() if c.endswith("attn.c_attn.bias")}
        try:
            from_huggingface(biases, cfg)
        except DsTrainerError as e:
            out.append(f"{KEY} {path}: {e}")
    return out


def _sizes_behind(name: str, cfg: GPTConfig) -> str:
    """The run-config sizes that decide the shape of tensor `name`."""
    if name.endswith(("wte.weight", "lm_head.weight")):
        return f"model.vocab_size {cfg.vocab_size}, model.n_embd {cfg.n_embd}"
    if name.endswith("wpe.weight"):
        return f"model.block_size {cfg.block_size}, model.n_embd {cfg.n_embd}"
    return f"model.n_embd {cfg.n_embd}"


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"{len(names)} tensor{'s' if len(names) > 1 else ''} ({shown}{more})"


def load_initial_weights(model: nn.Module, path: str, config: GPTConfig) -> None:
    """Copy the weights at `path` into `model` as `build_model` returned it, before deepspeed.initialize.

    A plain GPT takes every tensor; a GPTPipeline only its stage's layers; a GPT built in zero.Init has
    each parameter gathered, filled and partitioned again. Every rank reads the file itself (the same
    values everywhere), one tensor at a time. Raises DsTrainerError for weights that do not fit.
    """
    import deepspeed  # only where weights are loaded: the checks above need no DeepSpeed

    problems = init_from_problems(path, config)
    if problems:
        raise DsTrainerError(join_problems(problems))
    source = locate(path)
    targets = _parameters_by_gpt_name(model, config)
    with WeightsFile(source.weights) as f, torch.no_grad():
        for name in f.shapes():
            ours = hf_name_to_ours(name) if source.huggingface else name
            if ours not in targets:
                continue  # another stage's layer, a mask buffer, a tied head or a dropped zero bias
            tensor = f.tensor(name)
            value = from_huggingface({name: tensor}, config)[ours] if source.huggingface else tensor
            param = targets.pop(ours)
            # A no-op for a parameter that is not partitioned; under ZeRO-3 rank 0's copy is the one kept.
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(value)  # in place: the gathered tensor stays on its device, in its dtype
    if targets:  # init_from_problems has passed, so this is a bug, not the user's
        raise RuntimeError(f"{KEY} {path}: no weights for {', '.join(sorted(targets))}")


def _parameters_by_gpt_name(model: nn.Module, config: GPTConfig) -> dict[str, nn.Parameter]:
    """This process's parameters under the plain GPT's names: all of a GPT's, one stage's of a GPTPipeline."""
    if isinstance(model, GPT):
        return dict(model.named_parameters())  # a tied head once, as wte.weight
    from ds_trainer.pipeline import LayerMap  # imports deepspeed.pipe: only for pipelines

    layers, out = LayerMap(config.n_layer), {}
    for module in model.tied_modules.values():  # the tied embedding, on the first and the last stage
        out.update(module.named_parameters())
    for idx in model.local_layer_indices():
        module = getattr(model, str(idx), None)  # a tied layer is not a submodule of its own
        if module is not None:
            out.update(module.named_parameters(prefix=layers.gpt_name(idx)))
    return out
