"""The run config: typed sections, YAML plus `--section.key value` overrides, validation that reports everything."""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ds_trainer.errors import ConfigError, Problems
from ds_trainer.host_malloc import CHOICES as HOST_MALLOC_CHOICES
from ds_trainer.model import PRESETS, GPTConfig
from ds_trainer.yaml_io import YamlLoader, read_yaml

__all__ = ["ConfigError", "RunConfig", "load_run_config", "read_yaml"]  # ConfigError's home is errors


@dataclass
class ModelSection:
    preset: str | None = "gpt2-tiny"
    """A preset from ds_trainer.model.PRESETS (gpt2-tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl); null for a custom size."""
    n_layer: int | None = None
    """Number of blocks; overrides the preset's (required without a preset)."""
    n_head: int | None = None
    """Attention heads; overrides the preset's (required without a preset)."""
    n_embd: int | None = None
    """Residual width; overrides the preset's (required without a preset)."""
    block_size: int | None = None
    """Position-embedding length, the longest context the model takes; overrides the preset's."""
    vocab_size: int | None = None
    """Vocabulary size; defaults to GPT-2's 50257."""
    dropout: float = 0.0
    """Dropout probability (0 for pretraining at scale; try 0.1 on small corpora)."""
    qkv_bias: bool = True
    """Bias on the query/key/value projection."""
    tie_embeddings: bool = True
    """Tie the LM head to the token embedding."""
    init: str = "gpt2"
    """Initial weights: gpt2 (normal, std 0.02, scaled residual projections) or torch (each module's PyTorch
    default, as the from-scratch books' model). The same weights under every ZeRO stage and pipeline layout."""
    init_from: str = ""
    """Warm start: a Hugging Face GPT-2 folder (config.json with model.safetensors or pytorch_model.bin) or a
    model.safetensors written by launch/export.py, loaded as the initial weights (a fresh start only; a resume
    takes its checkpoint's). Every tensor must match the configured model's shape. Empty: model.init."""

    def gpt_config(self) -> GPTConfig:
        sizes = {
            k: getattr(self, k)
            for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
            if getattr(self, k) is not None
        }
        extra = {
            "dropout": self.dropout,
            "qkv_bias": self.qkv_bias,
            "tie_embeddings": self.tie_embeddings,
            "init": self.init,
        }
        if self.preset is not None:
            return GPTConfig.from_preset(self.preset, **sizes, **extra)
        return GPTConfig(**sizes, **extra)

    def preset_problems(self) -> list[str]:
        """What keeps the section from naming a model: an unknown preset, or no preset and a size missing."""
        if self.preset is not None and self.preset not in PRESETS:
            return [f"model.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)} or null"]
        if self.preset is None:
            return [
                f"model.{k} is required when model.preset is null"
                for k in ("n_layer", "n_head", "n_embd", "block_size")
                if getattr(self, k) is None
            ]
        return []

    def problems(self) -> list[str]:
        return self.preset_problems() or self.gpt_config().problems()


@dataclass
class DataSection:
    path: str = ""
    """What to train on: a folder made by launch/prepare_data.py (memory-mapped shards, any size), or text read
    into memory: a file, a folder (every *.txt below it) or a glob. Empty: the built-in corpus (no download)."""
    mixture: dict[str, float] | None = None
    """Several datasets with weights, e.g. {data/web: 0.7, data/books: 0.3}; each path as in data.path. Replaces path."""
    context_length: int | None = None
    """Tokens per training window; defaults to the model's block_size and may not exceed it."""
    stride: int | None = None
    """Tokens between the starts of consecutive windows; defaults to context_length (no overlap)."""
    val_fraction: float | None = None
    """Share of a text corpus (its last tokens) held out for validation (default 0.1); 0 disables evaluation.
    Prepared folders bring the validation split made at preparation instead, so it is an error there."""

    def problems(self) -> list[str]:
        out = []
        if self.mixture is not None:
            if self.path:
                out.append("data.path and data.mixture are both set; list every dataset in data.mixture")
            if not self.mixture:
                out.append("data.mixture is empty; give at least one path: weight")
            for path, weight in self.mixture.items():
                if weight <= 0:
                    out.append(f"data.mixture weight of {path!r} must be > 0, got {weight}")
        out += _below("data", self, ("stride",), 1)
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            out.append(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        return out


@dataclass
class TrainSection:
    max_steps: int | None = None
    """Optimizer steps to train for. Set this or epochs; with neither, 300 steps."""
    epochs: float | None = None
    """Passes over the training windows, converted to steps; an alternative to max_steps."""
    seed: int = 1234
    """Seed for weights, data order, dropout and sampling."""
    micro_batch_size: int | None = None
    """Windows per rank per forward pass; fills the JSON's "auto" train_micro_batch_size_per_gpu (default 4)."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step; fills the JSON's "auto" gradient_accumulation_steps (default 1)."""
    peak_lr: float | None = None
    """Learning rate after warm-up; fills the optimizer's "auto" lr (default 6e-4)."""
    initial_lr: float | None = None
    """Learning rate at step 0, rising linearly to peak_lr over warmup_steps (default 0)."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay (default peak_lr / 10)."""
    warmup_steps: int | None = None
    """Linear warm-up steps, at least 2 (DeepSpeed's floor); fills the scheduler's "auto" warmup_num_steps
    (default: 10% of the steps, at least 2)."""
    weight_decay: float | None = None
    """Decoupled weight decay; fills the optimizer's "auto" (or absent) weight_decay (default 0.1)."""
    max_norm: float | None = None
    """Gradient-norm clipping threshold, 0 for none; fills the JSON's "auto" (or absent) gradient_clipping
    (default 1.0)."""
    clip_from_step: int = 0
    """Gradient clipping starts at this step (counted from 0, as the books' loop counts); before it, none.
    The books' recipe clips from the end of the warm-up."""
    decay_all_parameters: bool = False
    """Decay every parameter, as the books' single-group AdamW does. By default biases, LayerNorm weights and
    embeddings are exempt, which is right for pretraining."""
    rampup_start_batch: int | None = None
    """Batch-size ramp-up: the global batch (in windows) at the start, growing linearly to the configured one.
    A multiple of micro_batch_size × ranks. With a ramp-up, max_steps and the learning-rate schedule count
    steps of the full batch, so the schedule follows samples seen, not optimizer steps."""
    rampup_samples: int | None = None
    """Windows over which the batch grows to its full size (set this or rampup_tokens)."""
    rampup_tokens: int | None = None
    """Tokens over which the batch grows to its full size (set this or rampup_samples)."""
    time_limit: float | None = None
    """Wall-clock budget in seconds from the process start (e.g. the job's time limit): before it runs out the
    run saves a checkpoint and exits with 85 ("requeue me"), leaving room for one more step and a save."""
    stop_grace: float = 600.0
    """Seconds a stop (SIGTERM, SIGUSR1 or the time limit) may spend saving before the process exits anyway."""
    compile: bool = False
    """Compile the model with torch.compile through DeepSpeed's `engine.compile()` (the JSON's `compile`
    section tunes it). The first step of each process pays the compilation; its time is logged."""
    host_memory_gb: float | None = None
    """Host memory per node, GiB, that the JSON's "auto" offload sizes are derived from (docs/planning.md);
    default: the machine's RAM or its cgroup's limit, whichever is lower."""
    host_malloc: str = "auto"
    """What glibc does with host memory a step frees (ds_trainer/host_malloc.py): "keep" it for the next step
    (faster on CPU, more resident memory), "release" every block above 128 KiB to the kernel (least
    resident memory), "glibc" (its defaults), or "auto": keep when the steps run on the CPU, nothing is
    offloaded and the model's training states take at most a quarter of the host's memory, release under
    ZeRO offload or on a tighter CPU host, glibc's defaults on an accelerator."""
    watchdog_timeout: float = 1800.0
    """Seconds without progress (a step, an evaluation or a save finishing) after which a rank dumps every
    thread's stack and exits non-zero; longer than the slowest save. 0 disables."""

    def problems(self) -> list[str]:
        out = self._rampup_problems()
        if self.max_steps is not None and self.epochs is not None:
            out.append("train.max_steps and train.epochs are both set; set one")
        out += _below("train", self, ("max_steps",), 1)
        if self.time_limit is not None and self.time_limit <= 0:
            out.append(f"train.time_limit must be > 0 seconds, got {self.time_limit}")
        if self.epochs is not None and self.epochs <= 0:
            out.append(f"train.epochs must be > 0, got {self.epochs}")
        out += _below("train", self, ("micro_batch_size", "gradient_accumulation_steps", "warmup_steps"), 1)
        out += _below("train", self, ("peak_lr", "initial_lr", "min_lr", "weight_decay", "max_norm"), 0)
        if self.peak_lr is not None and self.peak_lr == 0:
            out.append("train.peak_lr must be > 0")
        out += _below("train", self, ("stop_grace", "watchdog_timeout", "clip_from_step"), 0)
        if self.host_memory_gb is not None and self.host_memory_gb <= 0:
            out.append(f"train.host_memory_gb must be > 0, got {self.host_memory_gb}")
        if self.host_malloc not in HOST_MALLOC_CHOICES:
            out.append(
                f"train.host_malloc must be one of {', '.join(HOST_MALLOC_CHOICES)}, got {self.host_malloc!r}"
            )
        return out

    def _rampup_problems(self) -> list[str]:
        out = []
        if self.rampup_start_batch is not None:
            out += _below("train", self, ("rampup_start_batch",), 1)
            if (self.rampup_samples is None) == (self.rampup_tokens is None):
                out.append(
                    "train.rampup_start_batch needs exactly one of train.rampup_samples or train.rampup_tokens"
                )
        elif self.rampup_samples is not None or self.rampup_tokens is not None:
            out.append("train.rampup_samples/rampup_tokens need train.rampup_start_batch")
        return out + _below("train", self, ("rampup_samples", "rampup_tokens"), 1)


@dataclass
class PipelineSection:
    stages: int = 1
    """Pipeline stages the model is cut into (1: no pipeline). Ranks / stages must be whole; each pipeline
    is one data-parallel replica. DeepSpeed's pipeline engine works with ZeRO 0 and 1."""
    partition: str = "parameters"
    """How blocks are spread over stages: parameters (balanced by parameter count), uniform (by layer count),
    or blocks:a,b,... (transformer blocks per stage; the embedding goes with the first, the head with the last)."""
    micro_batches: int | None = None
    """Micro-batches per step in the pipeline schedule; the same number as train.gradient_accumulation_steps."""

    def problems(self) -> list[str]:
        return _below("pipeline", self, ("stages", "micro_batches"), 1)


@dataclass
class EvalSection:
    interval: int = 100
    """Steps between evaluations, which also run after the first update and at the last step; 0 disables
    evaluation."""
    iters: int = 10
    """Micro-batches per rank of each split (training and validation) in one evaluation."""
    sample_prompt: str = "The meaning of"
    """Prompt continued by the model at each evaluation; empty disables sampling."""
    sample_tokens: int = 32
    """Tokens generated for the sample."""
    temperature: float = 0.8
    """Sampling temperature; 0 is greedy."""
    top_k: int = 50
    """Sample from the k most likely tokens; 0 for all."""
    sample_every_epoch: bool = False
    """Sample at the end of every epoch instead of at every evaluation (the books' loop prints one after each
    epoch)."""

    def problems(self) -> list[str]:
        out = _below("eval", self, ("interval", "sample_tokens", "top_k"), 0)
        return out + _below("eval", self, ("iters",), 1)


@dataclass
class CheckpointSection:
    dir: str = "runs/default"
    """The run's folder: DeepSpeed checkpoints (one sub-folder per save, `latest` naming the newest), and by
    default TensorBoard events and metrics. A run resumes from the latest checkpoint found here."""
    save_interval: int = 100
    """Steps between checkpoints (one is always written at the end); 0 saves only at the end."""
    resume: bool = True
    """Resume from the newest checkpoint in dir that checks out, when there is one."""
    keep_last: int = 3
    """Checkpoints kept: the newest keep_last (0 keeps all); older ones are deleted after each save."""
    keep_every: int = 0
    """Also keep for good every checkpoint whose step is a multiple of this (0: none)."""
    save_every_epoch: bool = False
    """Also save at the step that ends each epoch of the training windows."""
    resume_from: str | None = None
    """Resume from this checkpoint of dir (a tag like step_00000060, or its step number) instead of the newest.
    Newer checkpoints are moved to dir/branched/ (kept, never deleted) and the run says it branched; a restart
    of the branch resumes from the branch's newest checkpoint."""
    verify: str = "checksum"
    """Resume check of the newest checkpoint: checksum (every file's size and CRC-32, one full read, shared
    by the ranks) or size (presence and sizes only, for checkpoints too large to read at start-up)."""

    def problems(self) -> list[str]:
        out = _below("checkpoint", self, ("save_interval", "keep_last", "keep_every"), 0)
        if not self.dir:
            out.append("checkpoint.dir must not be empty")
        if self.verify not in ("checksum", "size"):
            out.append(f"checkpoint.verify must be checksum or size, got {self.verify!r}")
        if self.resume_from is not None and not self.resume:
            out.append("checkpoint.resume_from is set but checkpoint.resume is false; remove one of them")
        return out


@dataclass
class GuardSection:
    spike_factor: float = 2.0
    """Withhold the update of a step whose loss exceeds this multiple of the running mean (0: off). Non-finite
    losses are always withheld."""
    spike_window: int = 100
    """Good steps in the running mean; spikes are looked for only once it is full (a warm-up)."""
    rollback_after: int = 3
    """Consecutive withheld steps after which the run rolls back to its newest good checkpoint, skips the data
    since, and lowers the learning rate (0: never roll back)."""
    lr_factor: float = 0.5
    """Learning-rate multiplier after a rollback."""
    lr_steps: int = 100
    """Steps the lowered learning rate lasts after a rollback."""

    def problems(self) -> list[str]:
        out = _below("guard", self, ("spike_window",), 1)
        if not 0.0 < self.lr_factor <= 1.0:
            out.append(f"guard.lr_factor must be in (0, 1], got {self.lr_factor}")
        return out + _below("guard", self, ("spike_factor", "rollback_after", "lr_steps"), 0)

    def changed(self) -> list[str]:
        """The keys set to something other than their default, as `guard.<key>`."""
        return [f"guard.{f.name}" for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]


@dataclass
class LogSection:
    interval: int = 10
    """Steps between console lines and logged scalars."""
    tensorboard_dir: str | None = None
    """TensorBoard event folder; default <checkpoint.dir>/tb. Empty string disables TensorBoard."""
    jsonl: str | None = None
    """Metrics as JSON lines; default <checkpoint.dir>/metrics.jsonl. Empty string disables it."""
    wandb_project: str = ""
    """Weights & Biases project: adds a wandb sink (rank 0) with the same scalars and samples. Needs the
    extra: pip install -e .[wandb]. WANDB_MODE=offline logs with no network. Empty: no wandb."""
    wandb_entity: str = ""
    """Weights & Biases entity (user or team); empty: wandb's default."""
    wandb_run_name: str = ""
    """Weights & Biases run name; empty: the run folder's name."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device in the run's precision, what MFU is measured against. Default: the
    datasheet figure for known GPUs (ds_trainer/flops.py), a matmul probe at start-up on a CPU."""

    def problems(self) -> list[str]:
        out = _below("log", self, ("interval",), 1)
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            out.append(f"log.peak_tflops must be > 0, got {self.peak_tflops}")
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            out.append(
                f"log.wandb_project={self.wandb_project!r} needs wandb, which is not installed; "
                "pip install -e .[wandb] or remove log.wandb_project"
            )
        return out


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    guard: GuardSection = field(default_factory=GuardSection)
    log: LogSection = field(default_factory=LogSection)

    def gpt_config(self) -> GPTConfig:
        return self.model.gpt_config()

    def data_sources(self) -> dict[str, float]:
        """Path → weight for every dataset of the run (one, unless data.mixture is set)."""
        return dict(self.data.mixture) if self.data.mixture else {self.data.path: 1.0}

    @property
    def rampup_samples(self) -> int | None:
        train = self.train
        if train.rampup_tokens is not None:
            return -(-train.rampup_tokens // self.context_length)
        return train.rampup_samples

    @property
    def context_length(self) -> int:
        return self.data.context_length or self.gpt_config().block_size

    @property
    def stride(self) -> int:
        return self.data.stride or self.context_length

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint.dir)

    @property
    def tensorboard_dir(self) -> Path | None:
        d = self.log.tensorboard_dir
        return (self.run_dir / "tb") if d is None else (Path(d) if d else None)

    @property
    def jsonl_path(self) -> Path | None:
        p = self.log.jsonl
        return (self.run_dir / "metrics.jsonl") if p is None else (Path(p) if p else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_BAD = object()


def _coerce(value: Any, tp: Any, where: str, problems: Problems) -> Any:
    """Check `value` against the annotation `tp`; ints widen to float, nothing else is converted.

    A value of the wrong type is reported and returned as _BAD, so the field keeps its default and
    the value checks can still run and report their own problems in the same message.
    """
    args = typing.get_args(tp)
    optional = (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if optional else tp
    if value is None:
        if optional:
            return None
        problems.add(f"{where}: null is not allowed, expected {getattr(base, '__name__', base)}")
        return _BAD
    if typing.get_origin(base) is dict:  # only dict[str, float] is used: a mapping of names to weights
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in value.items()
        )
        if not ok:
            problems.add(f"{where}: expected a mapping of path: weight, got {value!r}")
            return _BAD
        return {k: float(v) for k, v in value.items()}
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        problems.add(f"{where}: expected {base.__name__}, got {type(value).__name__} {value!r}")
        return _BAD
    return value


def _parse_cli_value(raw: str, tp: Any) -> Any:
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if base is str and not optional:
        return raw  # a path like "2024", or a prompt like "none", stays text
    if raw.lower() in ("null", "none", "~"):
        return None
    if base is str:
        return raw
    try:
        return yaml.load(raw, Loader=YamlLoader)
    except yaml.YAMLError:
        return raw


def parse_overrides(argv: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Split `--section.key value` / `--section.key=value` pairs; returns raw values and problems."""
    out: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            problems.append(f"unrecognised argument {arg!r}; overrides take the form --section.key value")
            i += 1
            continue
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv):
            key, raw = arg[2:], argv[i + 1]
            i += 2
        else:
            problems.append(f"{arg}: missing value")
            i += 1
            continue
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = raw
    return out, problems


def load_run_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then command-line overrides; every problem found is raised at once."""
    problems = Problems()
    raw: dict[str, Any] = {}
    source = "run config"
    if path:
        source = path
        raw = read_yaml(path, "run config", "--config") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"run config {path} must be a mapping of sections, got {type(raw).__name__}")

    cli, cli_problems = parse_overrides(overrides or [])
    problems.extend(cli_problems)
    classes = _section_classes()
    sections: dict[str, Any] = {}
    for name, cls in classes.items():
        types_ = _field_types(cls)
        values: dict[str, Any] = {}
        file_section = raw.get(name) or {}
        if not isinstance(file_section, dict):
            problems.add(f"{source}: section '{name}' must be a mapping, got {type(file_section).__name__}")
            file_section = {}
        for key, value in file_section.items():
            if key not in types_:
                problems.add(f"{source}: unknown key '{name}.{key}'; known: {', '.join(types_)}")
                continue
            values[key] = _coerce(value, types_[key], f"{source}: {name}.{key}", problems)
        for key, value in cli.get(name, {}).items():
            if key not in types_:
                problems.add(f"unknown option --{name}.{key}; known in '{name}': {', '.join(types_)}")
                continue
            values[key] = _coerce(
                _parse_cli_value(value, types_[key]), types_[key], f"--{name}.{key}", problems
            )
        sections[name] = cls(**{k: v for k, v in values.items() if v is not _BAD})
    for name in raw:
        if name not in classes:
            problems.add(f"{source}: unknown section '{name}'; known: {', '.join(classes)}")
    for name in cli:
        if name not in classes:
            problems.add(f"unknown option section --{name}.*; known: {', '.join(classes)}")
    cfg = RunConfig(**sections)
    problems.extend(value_problems(cfg))
    problems.raise_if_any(ConfigError)
    return cfg


def value_problems(cfg: RunConfig) -> list[str]:
    """Value checks within and across fields; every problem found, as sentences naming the key."""
    problems = Problems()
    problems.extend(cfg.model.problems())
    problems.extend(cfg.data.problems())
    problems.extend(cfg.train.problems())
    problems.extend(cfg.pipeline.problems())
    problems.extend(cross_section_problems(cfg))
    problems.extend(cfg.guard.problems())
    problems.extend(cfg.eval.problems())
    problems.extend(cfg.checkpoint.problems())
    problems.extend(cfg.log.problems())
    return problems.items


def cross_section_problems(cfg: RunConfig) -> list[str]:
    """Checks that read more than one section; those that need the model's shape only once it has one."""
    out = []
    data, train, pipeline = cfg.data, cfg.train, cfg.pipeline
    gpt = None if cfg.model.preset_problems() else cfg.gpt_config()
    if gpt is not None and data.context_length is not None and not 1 <= data.context_length <= gpt.block_size:
        out.append(
            f"data.context_length {data.context_length} must be in [1, model block_size {gpt.block_size}]"
        )
    micro_batches = pipeline.micro_batches
    if (
        micro_batches is not None
        and micro_batches >= 1
        and train.gradient_accumulation_steps not in (None, micro_batches)
    ):
        out.append(
            f"pipeline.micro_batches={micro_batches} and train.gradient_accumulation_steps="
            f"{train.gradient_accumulation_steps} are the same setting; give one"
        )
    if pipeline.stages > 1:
        out += [
            f"{setting} with pipeline.stages={pipeline.stages}: {why}; remove it or set pipeline.stages to 1"
            for setting, why in _pipeline_refusals(cfg)
        ]
    if pipeline.stages > 1 and gpt is not None and not gpt.problems() and pipeline.stages > gpt.n_layer:
        out.append(
            f"pipeline.stages={pipeline.stages} exceeds model.n_layer={gpt.n_layer}; use at most {gpt.n_layer} "
            "stages (one block each)"
        )
    return out


def _pipeline_refusals(cfg: RunConfig) -> list[tuple[str, str]]:
    """(setting, why) for each setting the pipeline engine cannot honour: it trains a fixed number of
    micro-batches, with forward, backward and the update inside one call, stage by stage."""
    train, guard = cfg.train, ", ".join(cfg.guard.changed())
    refusals = [  # (set?, setting, why)
        (train.rampup_start_batch is not None, f"train.rampup_start_batch={train.rampup_start_batch}", "the "
         "pipeline engine trains a fixed batch"),
        (bool(guard), f"{guard} set", "the pipeline engine updates inside one call, so the loss guard cannot withhold an "
         "update"),
        (train.clip_from_step > 0, f"train.clip_from_step={train.clip_from_step}", "clipping that starts "
         "mid-run is built for the data-parallel step only"),
        (train.compile, "train.compile=true", "DeepSpeed compiles one whole module, not a pipeline's stages"),
    ]  # fmt: skip
    return [(setting, why) for on, setting, why in refusals if on]


def _below(section: str, values: object, keys: tuple[str, ...], floor: int) -> list[str]:
    """`<section>.<key> must be >= floor` for each of `keys` set (not None) to less than `floor`."""
    out = []
    for key in keys:
        value = getattr(values, key)
        if value is not None and value < floor:
            out.append(f"{section}.{key} must be >= {floor}, got {value}")
    return out
