"""Rules for the DeepSpeed JSON values DeepSpeed itself passes on unchecked (top-level scalars, optimizer and
scheduler parameters, activation checkpointing, aio): each value's type and range, as one line per problem."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any

AUTO = "auto"


def show(value: Any) -> str:
    """A value as the user wrote it in the JSON."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def closest(word: str, options: Any) -> str | None:
    """The option `word` is most likely a typo of, ignoring case ("sgd" → "SGD"), or None."""
    by_lower: dict[str, str] = {}
    for o in options:
        by_lower.setdefault(str(o).lower(), str(o))  # the first spelling of a name wins
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


# --- rules for values DeepSpeed does not check -----------------------------------------------------------


@dataclass(frozen=True)
class Num:
    """A JSON number (an integer if `integer`) between `lo` and `hi`, open at an end where said."""

    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    lo_open: bool = False
    hi_open: bool = False
    null: bool = False

    def problem(self, v: Any) -> str | None:
        if v is None and self.null:
            return None
        kind = int if self.integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, kind) or not self.in_range(v):
            return f"must be {self}"
        return None

    def in_range(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        below = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        above = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        return not (below or above)

    def __str__(self) -> str:
        what = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            what += (
                f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
            )
        elif self.lo is not None:
            what += f" {'>' if self.lo_open else '>='} {self.lo:g}"
        return what + (" or null" if self.null else "")


@dataclass(frozen=True)
class Flag:
    """true or false: DeepSpeed tests these for truth, so the string "false" would switch a feature on."""

    null: bool = False

    def problem(self, v: Any) -> str | None:
        if isinstance(v, bool) or (v is None and self.null):
            return None
        return "must be true or false" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def problem(self, v: Any) -> str | None:
        if isinstance(v, str) and v in self.values:
            return None
        return "must be one of " + ", ".join(show(x) for x in self.values)


@dataclass(frozen=True)
class Betas:
    """Adam's and Lion's (beta1, beta2): DeepSpeed unpacks two and the kernels need each below 1."""

    def problem(self, v: Any) -> str | None:
        beta = Num(0, 1, hi_open=True)
        if isinstance(v, list | tuple) and len(v) == 2 and all(beta.problem(b) is None for b in v):
            return None
        return "must be a list of two numbers in [0, 1), e.g. [0.9, 0.95]"


# Top-level values DeepSpeed reads with get_scalar_param, which checks nothing.
TOP_LEVEL_RULES: dict[str, Any] = {
    "gradient_clipping": Num(0),  # a negative value silently turns clipping off
    "steps_per_print": Num(1, integer=True),
    "gradient_predivide_factor": Num(0, lo_open=True),
    **{
        k: Flag()
        for k in (
            "prescale_gradients",
            "wall_clock_breakdown",
            "memory_breakdown",
            "dump_state",
            "disable_allgather",
            "dataloader_drop_last",
            "sparse_gradients",
            "zero_allow_untested_optimizer",
            "zero_force_ds_cpu_optimizer",
        )
    },
}
# Read key by key with get_scalar_param too; a key DeepSpeed does not know is ignored, so it is refused.
SECTION_RULES: dict[str, dict[str, Any]] = {
    "activation_checkpointing": {
        **{
            k: Flag()
            for k in (
                "partition_activations",
                "contiguous_memory_optimization",
                "cpu_checkpointing",
                "synchronize_checkpoint_boundary",
                "profile",
            )
        },
        "number_checkpoints": Num(1, integer=True, null=True),
    },
    "aio": {
        "block_size": Num(1, integer=True),
        "queue_depth": Num(1, integer=True),
        "intra_op_parallelism": Num(1, integer=True),
        "single_submit": Flag(),
        "overlap_events": Flag(),
        "use_gds": Flag(),
    },
}
# Sections whose unknown keys are refused.
CLOSED_SECTIONS = ("activation_checkpointing", "aio")
# Keys DeepSpeed renamed: configs written for older versions still carry the old name, which 0.19 ignores.
RENAMED_KEYS = {"thread_count": "intra_op_parallelism"}
# Ranges DeepSpeed's fp16 model leaves open (it checks the types).
FP16_RANGES = {
    "initial_scale_power": Num(0),  # a loss scale below 1 shrinks the gradients it should protect
    "hysteresis": Num(1),  # below 1 an overflow never lowers the loss scale (DynamicLossScaler)
}
OPTIMIZER_RULES: dict[str, Any] = {
    "lr": Num(0, lo_open=True),
    "betas": Betas(),
    "eps": Num(0, lo_open=True),
    "weight_decay": Num(0),
    "momentum": Num(0, 1, hi_open=True),
    "dampening": Num(0, 1),
    "lr_decay": Num(0),
    "initial_accumulator_value": Num(0),
    **{
        k: Flag()
        for k in (
            "nesterov",
            "amsgrad",
            "maximize",
            "bias_correction",
            "adam_w_mode",
            "torch_adam",
            "fp32_optimizer_states",
            "set_grad_none",
            "capturable",
            "differentiable",
        )
    },
    "foreach": Flag(null=True),
    "fused": Flag(null=True),
}
SCHEDULER_RULES: dict[str, Any] = {
    "total_num_steps": Num(1, integer=True),
    "warmup_num_steps": Num(1, integer=True),
    "warmup_min_ratio": Num(0, 1),
    "cos_min_ratio": Num(0, 1),
    "warmup_min_lr": Num(0),
    "warmup_max_lr": Num(0, null=True),
    "warmup_type": Choice(("log", "linear")),  # DeepSpeed falls back to "log" for anything else
    "last_batch_iteration": Num(-1, integer=True),
}


def rule_problems(values: dict[str, Any], rules: dict[str, Any], prefix: str, source: str) -> list[str]:
    out = []
    for key, rule in rules.items():
        if key in values and (why := rule.problem(values[key])):
            out.append(f"{source}: {prefix}{key}={show(values[key])} {why}")
    return out


def unknown_key_problems(
    values: dict[str, Any], known: Any, prefix: str, source: str, what: str
) -> list[str]:
    return [unknown_key(k, known, prefix, source, f"{what} reads") for k in values if k not in known]


def unknown_key(key: str, known: Any, prefix: str, source: str, takes: str, context: str = "") -> str:
    """The line for one unknown key: the closest known name, or every known name after `takes`."""
    close = closest(key, known)
    hint = f"did you mean '{close}'?" if close else f"{takes} {', '.join(sorted(known))}"
    if RENAMED_KEYS.get(key) in known:
        hint = f"DeepSpeed 0.19 reads it as '{prefix}{RENAMED_KEYS[key]}'"
    return f"{source}: unknown key '{prefix}{key}'{context}; {hint}"


# Top-level keys DeepSpeed 0.19 reads. A key close to one of these is almost surely a typo that
# DeepSpeed would silently ignore (e.g. "zero_optimisation" runs plain ZeRO-0).
KNOWN_TOP_LEVEL_KEYS = frozenset(
    [
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "optimizer",
        "scheduler",
        "fp16",
        "bf16",
        "bfloat16",
        "amp",
        "torch_autocast",
        "gradient_clipping",
        "prescale_gradients",
        "gradient_predivide_factor",
        "sparse_gradients",
        "zero_optimization",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
        "activation_checkpointing",
        "flops_profiler",
        "tensorboard",
        "wandb",
        "csv_monitor",
        "comet",
        "comms_logger",
        "steps_per_print",
        "wall_clock_breakdown",
        "dump_state",
        "memory_breakdown",
        "dataloader_drop_last",
        "disable_allgather",
        "communication_data_type",
        "seq_parallel_communication_data_type",
        "elasticity",
        "autotuning",
        "compression_training",
        "data_efficiency",
        "curriculum_learning",
        "data_types",
        "checkpoint",
        "aio",
        "nebula",
        "pipeline",
        "sparse_attention",
        "progressive_layer_drop",
        "eigenvalue",
        "quantize_training",
        "hybrid_engine",
        "compile",
        "weight_quantization",
        "graph_harvesting",
        "timers",
        "gradient_allreduce_op",
        "disable_python_gc",
        "log_level",
        "expert_parallel",
        "use_data_before_expert_parallel_",
        "zenflow",
        "tensor_parallel",
    ]
)


def top_level_key_problems(cfg: dict[str, Any], source: str) -> list[str]:
    """Top-level keys DeepSpeed does not read, with the known key a typo most likely meant."""
    problems = []
    for key in cfg:
        if key not in KNOWN_TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, KNOWN_TOP_LEVEL_KEYS, n=1, cutoff=0.8)
            hint = f"did you mean '{close[0]}'?" if close else "DeepSpeed does not read it; remove it"
            problems.append(f"{source}: unknown key '{key}'; {hint}")
    return problems
