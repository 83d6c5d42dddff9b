"""The DeepSpeed JSON: read it, fill its "auto" values from the run, and check it fits the device.

The JSON stays in DeepSpeed's own format and DeepSpeed executes it. This module is the one place
where derived values are computed: batch sizes, the learning rate, the schedule's step counts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_trainer.config import RunConfig
from ds_trainer.data.sampler import BatchRampup
from ds_trainer.ds_internals import COSINE_FROM
from ds_trainer.ds_rules import AUTO, top_level_key_problems
from ds_trainer.ds_validate import (
    MIN_WARMUP_STEPS,
    deepspeed_refusal,
    json_problems,
    offload_device,
    precision_enabled,
    run_length,
    scheduler_class,
    shape_problems,
    zero_stage,
)
from ds_trainer.errors import DsTrainerError, Problems
from ds_trainer.offload import Host, resolve_offload

DEFAULT_MICRO_BATCH = 4
DEFAULT_PEAK_LR = 6e-4
DEFAULT_WEIGHT_DECAY = 0.1
DEFAULT_MAX_NORM = 1.0
DEFAULT_STEPS = 300

# Used when no --ds_config is given: plain data parallelism in fp32, which every device runs.
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_batch_size": AUTO,
    "train_micro_batch_size_per_gpu": AUTO,
    "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO,
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": AUTO, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": AUTO},
    },
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": AUTO,
            "warmup_num_steps": AUTO,
            "warmup_min_ratio": AUTO,
            "cos_min_ratio": AUTO,
            "warmup_type": "linear",
        },
    },
    "zero_optimization": {"stage": 0},
    "steps_per_print": 1_000_000_000,
}


@dataclass(frozen=True)
class ResolvedDSConfig:
    """The JSON with every "auto" filled in, and the figures derived on the way."""

    config: dict[str, Any]
    source: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    total_steps: int
    """Optimizer steps the run takes."""
    schedule_steps: int
    """Length of the run in steps of the full global batch; equals total_steps unless the batch ramps up."""
    host: Host
    """The host memory the offload sizes were derived from (train.host_memory_gb, else this machine's)."""
    rampup_start_batch: int | None = None
    rampup_samples: int = 0
    pipeline_stages: int = 1

    @property
    def train_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size

    def batch_schedule(self) -> BatchRampup:
        return BatchRampup(
            self.train_batch_size,
            self.micro_batch_size * self.data_parallel_size,
            self.rampup_start_batch,
            self.rampup_samples,
        )

    # Read as DeepSpeed's models read them: "auto" is the default, "false" is off.
    @property
    def zero_stage(self) -> int:
        return zero_stage(self.config)

    @property
    def fp16(self) -> bool:
        return precision_enabled(self.config, "fp16")

    @property
    def bf16(self) -> bool:
        return precision_enabled(self.config, "bf16")

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def offloaded(self) -> bool:
        """Whether ZeRO keeps the optimizer state or the parameters off the device (on the host or NVMe)."""
        sections = ("offload_optimizer", "offload_param")
        return any(offload_device(self.config, s) in ("cpu", "nvme") for s in sections)

    def loading_universal(self) -> ResolvedDSConfig:
        """This config set to load DeepSpeed's universal checkpoint format (resume on a new layout)."""
        checkpoint = {**self.config.get("checkpoint", {}), "load_universal": True}
        return dataclasses.replace(self, config={**self.config, "checkpoint": checkpoint})


def load_ds_json(path: str | None) -> tuple[dict[str, Any], str]:
    """The JSON as a dict and a name for messages; the built-in default when `path` is None."""
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG), "built-in DeepSpeed config"
    p = Path(path)
    if not p.is_file():
        raise DsTrainerError(f"DeepSpeed config {path} not found; pass an existing JSON file to --ds_config")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DsTrainerError(
            f"DeepSpeed config {path} line {e.lineno} column {e.colno} is not valid JSON: {e.msg}"
        ) from None
    if not isinstance(raw, dict):
        raise DsTrainerError(f"DeepSpeed config {path} must be a JSON object, got {type(raw).__name__}")
    return raw, path


def _is_auto(v: Any) -> bool:
    return v is None or v == AUTO


def _pick(
    json_value: Any, run_value: Any, default: Any, json_key: str, run_key: str, src: str, problems: Problems
) -> Any:
    """JSON number, else run-config value, else default; a JSON number that the run config contradicts is a problem."""
    if _is_auto(json_value):
        return default if run_value is None else run_value
    if run_value is not None and json_value != run_value:
        problems.add(
            f"{src}: {json_key}={json_value} disagrees with {run_key}={run_value}; "
            f'set one of them, or "auto" in the JSON'
        )
    return json_value


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int_problem(v: Any, key: str, src: str) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return f'{src}: {key} must be a positive integer or "auto", got {v!r}'
    return None


def resolve(
    raw: dict[str, Any],
    source: str,
    run: RunConfig,
    world_size: int,
    num_train_samples: int | None,
    accelerator: str,
    global_batch: int | None = None,
    host: Host | None = None,
) -> ResolvedDSConfig:
    """Fill every "auto" and check the whole JSON; raises DsTrainerError naming all problems at once.

    `num_train_samples` is None when the data could not be read (its problem is reported beside these).
    `global_batch` is a checkpoint's global batch when resuming on another number of ranks: the
    accumulation steps are chosen to keep it. `host` is the memory the offload sizes are derived from
    (None: train.host_memory_gb, else this machine's).
    """
    cfg = copy.deepcopy(raw)
    problems = Problems()
    problems.extend(shape_problems(cfg, source))
    stages = run.pipeline.stages
    if world_size % stages:
        problems.add(
            f"{world_size} ranks cannot be cut into pipeline.stages={stages}; use a number of ranks divisible by it"
        )
    dp = max(1, world_size // stages)
    problems.extend(top_level_key_problems(cfg, source))
    micro, gas = _resolve_batch(cfg, source, run, dp, global_batch, problems)
    total_steps = _total_steps(run, num_train_samples, micro, gas, dp, problems)
    _resolve_optimizer_and_schedule(cfg, source, run, total_steps, problems)
    problems.extend(device_problems(cfg, source, accelerator))
    _resolve_activation_checkpointing(cfg, source, run, problems)
    host = host or Host.detect(run.train.host_memory_gb)
    weight_bytes = 2 if precision_enabled(cfg, "bf16") or precision_enabled(cfg, "fp16") else 4
    resolve_offload(cfg, source, run.gpt_config(), weight_bytes, dp, host, problems)
    stage = zero_stage(cfg)
    if stages > 1 and stage > 1:
        problems.add(
            f"{source}: zero_optimization.stage={stage} with pipeline.stages={stages}; DeepSpeed's pipeline engine "
            "supports ZeRO 0 and 1 (e.g. ds_configs/zero1.json)"
        )
    optimizer_steps = _rampup_optimizer_steps(run, micro, gas, dp, total_steps, problems)
    problems.extend(json_problems(cfg, source, run, total_steps))
    if not problems:  # DeepSpeed's own parser last: what it refuses that the checks above do not know
        problems.extend(deepspeed_refusal(cfg, source))
    problems.raise_if_any()
    start = run.train.rampup_start_batch
    return ResolvedDSConfig(
        cfg,
        source,
        micro,
        gas,
        dp,
        optimizer_steps,
        total_steps,
        host,
        start,
        run.rampup_samples or 0,
        stages,
    )


def _resolve_batch(
    cfg: dict[str, Any], source: str, run: RunConfig, dp: int, global_batch: int | None, problems: Problems
) -> tuple[int, int]:
    """Micro batch and accumulation steps, written into the JSON: micro × accumulation × data-parallel
    ranks = global batch (`global_batch`, a checkpoint's, kept when it can be)."""
    micro, gas, tbs = _batch_settings(cfg, source, run, problems)
    if not _is_auto(tbs):
        micro, gas = _factors_of_train_batch(tbs, micro, gas, dp, source, problems)
    micro = micro or DEFAULT_MICRO_BATCH
    gas = gas or 1
    if global_batch is not None and micro * gas * dp != global_batch:
        if global_batch % (micro * dp):
            problems.add(
                f"the checkpoint's global batch {global_batch} cannot be kept with micro batch {micro} on {dp} "
                f"data-parallel ranks; set train.micro_batch_size to a divisor of {global_batch // dp or 1}"
            )
        else:
            gas = global_batch // (micro * dp)
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = gas
    cfg["train_batch_size"] = micro * gas * dp
    return micro, gas


def _batch_settings(
    cfg: dict[str, Any], source: str, run: RunConfig, problems: Problems
) -> tuple[Any, Any, Any]:
    """Micro batch, accumulation steps (None: not given) and train_batch_size ("auto": not given), from the
    JSON and the run config."""
    train = run.train
    gas_key = (
        "train.gradient_accumulation_steps" if train.gradient_accumulation_steps else "pipeline.micro_batches"
    )
    micro = _pick(
        cfg.get("train_micro_batch_size_per_gpu"),
        train.micro_batch_size,
        None,
        "train_micro_batch_size_per_gpu",
        "train.micro_batch_size",
        source,
        problems,
    )
    gas = _pick(
        cfg.get("gradient_accumulation_steps"),
        train.gradient_accumulation_steps or run.pipeline.micro_batches,
        None,
        "gradient_accumulation_steps",
        gas_key,
        source,
        problems,
    )
    tbs = cfg.get("train_batch_size")
    # A bad number is reported and then treated as "auto", so the checks after it still run.
    if micro is not None and (p := _int_problem(micro, "train_micro_batch_size_per_gpu", source)):
        problems.add(p)
        micro = None
    if gas is not None and (p := _int_problem(gas, "gradient_accumulation_steps", source)):
        problems.add(p)
        gas = None
    if not _is_auto(tbs) and (p := _int_problem(tbs, "train_batch_size", source)):
        problems.add(p)
        tbs = AUTO
    return micro, gas, tbs


def _factors_of_train_batch(
    tbs: int, micro: int | None, gas: int | None, dp: int, source: str, problems: Problems
) -> tuple[int, int]:
    """Micro batch and accumulation steps for a fixed global batch: DeepSpeed derives the missing factor;
    do the same, visibly. A factor that does not divide comes back as 0."""
    if micro is None and gas is None:
        micro = DEFAULT_MICRO_BATCH if tbs % (DEFAULT_MICRO_BATCH * dp) == 0 else 1
    given = None
    if gas is None:
        given, unit = f"micro batch {micro}", micro * dp
        gas = tbs // unit if tbs % unit == 0 else 0
    elif micro is None:
        given, unit = f"accumulation {gas}", gas * dp
        micro = tbs // unit if tbs % unit == 0 else 0
    if given is not None and micro * gas == 0:
        problems.add(
            f"{source}: train_batch_size={tbs} is not a multiple of {given} × {dp} data-parallel ranks = {unit}; "
            f'make it one (e.g. {max(unit, tbs // unit * unit)}) or set it to "auto"'
        )
    elif micro * gas * dp != tbs:
        problems.add(
            f"{source}: train_batch_size={tbs} is not micro batch {micro} × accumulation {gas} × "
            f'{dp} data-parallel ranks; make train_batch_size a multiple of {dp} ranks or set it to "auto"'
        )
    return micro, gas


def _total_steps(
    run: RunConfig, num_train_samples: int | None, micro: int, gas: int, dp: int, problems: Problems
) -> int:
    """Steps of the full global batch: train.max_steps, or train.epochs over the training windows."""
    global_batch = micro * gas * dp
    steps_per_epoch = 1 if num_train_samples is None else num_train_samples // global_batch
    if steps_per_epoch < 1:
        problems.add(
            f"the training split has {num_train_samples} windows, fewer than one global batch of {global_batch} "
            f"(micro {micro} × accumulation {gas} × {dp} ranks); add text, lower data.context_length or the batch sizes"
        )
    train = run.train
    if train.max_steps is not None:
        return train.max_steps
    if train.epochs is not None:
        return max(1, math.ceil(train.epochs * max(steps_per_epoch, 1)))
    return DEFAULT_STEPS


def _rampup_optimizer_steps(
    run: RunConfig, micro: int, gas: int, dp: int, total_steps: int, problems: Problems
) -> int:
    """Optimizer steps the run takes: `total_steps`, or more while a ramp-up trains smaller batches."""
    start = run.train.rampup_start_batch
    if start is None:
        return total_steps
    global_batch = micro * gas * dp
    if start % (micro * dp) or start >= global_batch:
        problems.add(
            f"train.rampup_start_batch={start} must be a multiple of micro batch {micro} × {dp} ranks and below "
            f"the global batch {global_batch}"
        )
        return total_steps
    ramp = BatchRampup(global_batch, micro * dp, start, run.rampup_samples or 0)
    return ramp.steps_for(total_steps * global_batch)


def _resolve_optimizer_and_schedule(
    cfg: dict[str, Any], source: str, run: RunConfig, total_steps: int, problems: Problems
) -> None:
    train = run.train
    peak = _resolve_lr(cfg, source, run, problems)
    _resolve_regularisation(cfg, source, run, problems)
    seed_style = any(v is not None for v in (train.initial_lr, train.min_lr, train.warmup_steps))
    books_schedule = seed_style or train.peak_lr is not None
    sched = cfg.get("scheduler")
    if sched is None:
        if seed_style:
            sched = cfg["scheduler"] = {"type": "WarmupCosineLR", "params": {}}
        else:
            return
    if sched.get("type") != "WarmupCosineLR":
        if scheduler_class(sched.get("type")) is None:
            return  # ds_validate names the unknown type; what else could be said depends on it
        if seed_style:
            problems.add(
                f"{source}: train.initial_lr/min_lr/warmup_steps map onto WarmupCosineLR, but the JSON's scheduler is "
                f"{sched.get('type')!r}; remove those keys or use WarmupCosineLR"
            )
        for key, value in sched.get("params", {}).items():
            if value == AUTO:
                problems.add(
                    f'{source}: scheduler.params.{key} is "auto", which is filled only for WarmupCosineLR'
                )
        if COSINE_FROM in sched:
            problems.add(f"{source}: scheduler.{COSINE_FROM} applies to WarmupCosineLR only; remove it")
        return
    _resolve_cosine_from(sched, source, books_schedule, problems)
    params = sched.setdefault("params", {})
    _resolve_warmup_cosine(params, source, run, peak, total_steps, problems)
    if seed_style and params.get("warmup_type", "linear") != "linear":
        problems.add(
            f"{source}: scheduler.params.warmup_type={params['warmup_type']!r}, but train.initial_lr/min_lr/warmup_steps "
            'describe a linear warm-up; set warmup_type to "linear"'
        )
    params.setdefault("warmup_type", "linear")


def _resolve_cosine_from(sched: dict[str, Any], source: str, books: bool, problems: Problems) -> None:
    """Where WarmupCosineLR's cosine counts from: the books' formula (from the warm-up's end) when the run
    config sets the schedule (train.initial_lr/peak_lr/min_lr/warmup_steps), DeepSpeed's own count otherwise."""
    given, want = sched.get(COSINE_FROM, AUTO), "warmup_end" if books else "deepspeed"
    if _is_auto(given):
        sched[COSINE_FROM] = want
    elif given not in ("warmup_end", "deepspeed"):
        problems.add(
            f'{source}: scheduler.{COSINE_FROM}={given!r} must be "warmup_end" (the books\' formula), "deepspeed" '
            'or "auto"'
        )
    elif books and given != want:
        problems.add(
            f'{source}: scheduler.{COSINE_FROM}="deepspeed" disagrees with the train.initial_lr/peak_lr/min_lr/'
            'warmup_steps set in the run config, which follow the books\' formula; set it to "warmup_end" or "auto"'
        )


def _resolve_regularisation(cfg: dict[str, Any], source: str, run: RunConfig, problems: Problems) -> None:
    """Fill the optimizer's weight_decay and the gradient clipping from train.weight_decay / train.max_norm.

    An absent key counts as "auto" once the run config sets its value; left absent otherwise, so a JSON
    without them runs on DeepSpeed's defaults as before.
    """
    train = run.train
    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        if "weight_decay" in params or train.weight_decay is not None:
            decay = params.get("weight_decay", AUTO)
            params["weight_decay"] = _pick(
                decay, train.weight_decay, DEFAULT_WEIGHT_DECAY, "optimizer.params.weight_decay",
                "train.weight_decay", source, problems,
            )  # fmt: skip
    elif train.weight_decay is not None:
        problems.add(
            f"{source}: train.weight_decay is set but the JSON has no optimizer section to apply it to"
        )
    if "gradient_clipping" in cfg or train.max_norm is not None:
        cfg["gradient_clipping"] = _pick(
            cfg.get("gradient_clipping", AUTO), train.max_norm, DEFAULT_MAX_NORM, "gradient_clipping",
            "train.max_norm", source, problems,
        )  # fmt: skip


def _resolve_lr(cfg: dict[str, Any], source: str, run: RunConfig, problems: Problems) -> float:
    """Fill the optimizer's lr; returns the peak learning rate the schedule's ratios are taken of."""
    train = run.train
    opt = cfg.get("optimizer")
    peak = train.peak_lr
    if opt is not None:
        params = opt.setdefault("params", {})
        lr = params.get("lr", AUTO)
        peak = _pick(
            lr, train.peak_lr, DEFAULT_PEAK_LR, "optimizer.params.lr", "train.peak_lr", source, problems
        )
        params["lr"] = peak
    elif peak is not None:
        problems.add(f"{source}: train.peak_lr is set but the JSON has no optimizer section to apply it to")
    # A bad lr stays in the JSON for ds_validate to report; the schedule's ratios use the default meanwhile.
    return peak if _is_number(peak) and peak > 0 else DEFAULT_PEAK_LR


def _resolve_warmup_cosine(
    p: dict[str, Any], source: str, run: RunConfig, peak: float, total_steps: int, problems: Problems
) -> None:
    """Fill WarmupCosineLR's "auto" params from the run; a given value the run contradicts is a problem."""
    train = run.train
    initial = 0.0 if train.initial_lr is None else train.initial_lr
    min_lr = peak / 10 if train.min_lr is None else train.min_lr
    default_warmup = max(MIN_WARMUP_STEPS, round(0.1 * total_steps))
    given_total = p.get("total_num_steps", AUTO)
    if _is_auto(given_total):
        p["total_num_steps"] = total_steps
    elif given_total != total_steps:
        # A schedule of another length decays too early or never reaches min_lr; say so instead of training on it.
        problems.add(
            f"{source}: scheduler.params.total_num_steps={given_total} disagrees with the run's {total_steps} steps "
            f'({run_length(run)}); set it to "auto" or {total_steps}'
        )
    p["warmup_num_steps"] = warmup = _pick(
        p.get("warmup_num_steps", AUTO),
        train.warmup_steps,
        default_warmup,
        "scheduler.params.warmup_num_steps",
        "train.warmup_steps",
        source,
        problems,
    )
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < MIN_WARMUP_STEPS:
        # WarmupCosineLR silently warms up over max(2, n) steps, so 1 would not give the schedule asked for.
        key = "train.warmup_steps" if train.warmup_steps is not None else "scheduler.params.warmup_num_steps"
        problems.add(
            f"{source}: {key}={warmup!r}, but DeepSpeed's WarmupCosineLR warms up over at least 2 steps; "
            "set it to an integer of 2 or more"
        )
    for key, ratio, run_key, given in (
        ("warmup_min_ratio", initial / peak, "train.initial_lr", train.initial_lr),
        ("cos_min_ratio", min_lr / peak, "train.min_lr", train.min_lr),
    ):
        if _is_auto(p.get(key)):
            p[key] = ratio
        elif given is not None and _is_number(p[key]) and not math.isclose(p[key], ratio, rel_tol=1e-9):
            problems.add(
                f"{source}: scheduler.params.{key}={p[key]} disagrees with {run_key}={given} "
                f"(ratio {ratio:g} of peak lr {peak:g}); set one of them"
            )


def _resolve_activation_checkpointing(
    cfg: dict[str, Any], source: str, run: RunConfig, problems: Problems
) -> None:
    """number_checkpoints "auto" is one per transformer block; settings DeepSpeed would assert on are problems."""
    ac = cfg.get("activation_checkpointing")
    if ac is None:
        return
    if ac.get("number_checkpoints") == AUTO:
        ac["number_checkpoints"] = run.gpt_config().n_layer
    if ac.get("contiguous_memory_optimization"):
        # DeepSpeed copies the saved activations of every checkpoint into one buffer cut from partitions.
        if not ac.get("partition_activations"):
            problems.add(
                f"{source}: activation_checkpointing.contiguous_memory_optimization needs partition_activations=true"
            )
        if ac.get("number_checkpoints") is None:
            problems.add(
                f"{source}: activation_checkpointing.contiguous_memory_optimization needs number_checkpoints "
                f'(the number of transformer blocks, or "auto")'
            )


def device_problems(cfg: dict[str, Any], source: str, accelerator: str) -> list[str]:
    """Settings this device or machine cannot run, found before DeepSpeed fails on them less clearly."""
    problems = []
    fp16, bf16 = precision_enabled(cfg, "fp16"), precision_enabled(cfg, "bf16")
    if fp16 and bf16:
        problems.append(f"{source}: fp16.enabled and bf16.enabled are both true; enable one of them")
    elif fp16 and accelerator == "cpu":
        problems.append(
            f"{source}: fp16.enabled=true, but DeepSpeed does not support fp16 on the CPU accelerator; "
            "use a bf16 or fp32 config on CPU (e.g. ds_configs/zero1.json), and fp16 on a GPU"
        )
    zero = cfg.get("zero_optimization", {})
    nvme = False
    for section in ("offload_optimizer", "offload_param"):
        off = zero.get(section)
        if isinstance(off, dict) and off.get("device") == "nvme":
            nvme = True
            problems += _nvme_path_problems(
                off.get("nvme_path"), f"zero_optimization.{section}.nvme_path", source
            )
    if nvme and not libaio_present():
        problems.append(
            f"{source}: NVMe offload needs libaio, which this machine lacks; install it (apt-get install libaio-dev)"
        )
    return problems


def libaio_present() -> bool:
    """Whether DeepSpeed can build its async I/O op here (it compiles a test program: about 0.2 s)."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


def _nvme_path_problems(path: Any, key: str, source: str) -> list[str]:
    if not path:
        return [f"{source}: {key} is required for NVMe offload; set it to a folder on a fast local disk"]
    if not isinstance(path, str):
        return []  # DeepSpeed's offload model reports the type
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        return [
            f"{source}: {key}={path} is not writable ({e.strerror}); point it at a writable folder on a local disk"
        ]
    return []


def launcher_world_size() -> int:
    """World size as the launcher announces it, known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))
