"""Check a resolved DeepSpeed JSON before any rank joins the process group.

DeepSpeed validates some sections with its own pydantic models, but only once `deepspeed.initialize`
runs: by then every rank is in the process group and a bad value ends in a traceback per rank. Other
values (optimizer and scheduler parameters, top-level scalars, activation checkpointing, aio) it
passes on unchecked, to fail later or, worse, to train on quietly. Here both kinds become lines for
the one `error:` message: DeepSpeed's own models for the sections it has them, our rules for the rest.
"""

from __future__ import annotations

import copy
import inspect
import re
from typing import TYPE_CHECKING, Any

from ds_trainer.ds_internals import (
    COSINE_FROM,
    builtin_optimizer_names,
    config_section_models,
    deepspeed_scheduler_class,
    parse_deepspeed_config,
    valid_schedule_names,
    zero_supported_optimizers,
)
from ds_trainer.ds_rules import (
    AUTO,
    CLOSED_SECTIONS,
    FP16_RANGES,
    OPTIMIZER_RULES,
    SCHEDULER_RULES,
    SECTION_RULES,
    TOP_LEVEL_RULES,
    closest,
    rule_problems,
    show,
    unknown_key,
    unknown_key_problems,
)

if TYPE_CHECKING:
    from ds_trainer.config import RunConfig

# DeepSpeed's WarmupCosineLR warms up over max(2, warmup_num_steps) steps (0.19.8, lr_schedules.py).
MIN_WARMUP_STEPS = 2


# --- the shape of the JSON ------------------------------------------------------------------------------

OBJECT_SECTIONS = (
    "optimizer",
    "scheduler",
    "zero_optimization",
    "fp16",
    "bf16",
    "bfloat16",
    "activation_checkpointing",
    "aio",
    "checkpoint",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "comms_logger",
    "compile",
    "hybrid_engine",
)


def shape_problems(cfg: dict[str, Any], source: str) -> list[str]:
    """Sections that are not JSON objects. They are removed from `cfg`, so the checks after this one
    read objects only and the problems of the other sections are still found."""
    out = []
    for key in OBJECT_SECTIONS:
        if key in cfg and not isinstance(cfg[key], dict):
            out.append(f"{source}: {key} must be a JSON object {{...}}, got {show(cfg.pop(key))}")
    for key in ("optimizer", "scheduler"):
        section = cfg.get(key, {})
        if "params" in section and not isinstance(section["params"], dict):
            out.append(
                f"{source}: {key}.params must be a JSON object {{...}}, got {show(section.pop('params'))}"
            )
    return out


# --- DeepSpeed's own models -----------------------------------------------------------------------------


def model_problems(cfg: dict[str, Any], source: str) -> list[str]:
    from pydantic import ValidationError

    out = []
    for key, model in config_section_models().items():
        if key not in cfg:
            continue
        try:
            model(**cfg[key])  # drops top-level "auto" values, as DeepSpeed does
        except ValidationError as e:
            out += [pydantic_line(err, key, model, source) for err in e.errors()]
            continue
        except (AssertionError, ValueError, TypeError) as e:  # raised outside pydantic (deprecated fields)
            out.append(f"{source}: {key}: {e}")
            continue
        if key == "fp16":
            numbers = {
                k: v for k, v in cfg[key].items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            out += rule_problems(numbers, FP16_RANGES, "fp16.", source)
    return out


def pydantic_line(err: dict, section: str, model: type, source: str) -> str:
    """One pydantic error as our line: the dotted key, the value given and what it must be."""
    loc = err["loc"]
    key = section + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = re.sub(r" for <class '[^']*'>", "", msg)  # "Input is not a valid path for <class 'pathlib.Path'>"
    if err["type"] == "extra_forbidden":
        known = model_keys(model, loc[:-1])
        close = closest(loc[-1], known)
        hint = f"did you mean '{close}'?" if close else "DeepSpeed does not read it; remove it"
        return f"{source}: unknown key '{key}'; {hint}"
    if err["type"] == "missing":
        return f"{source}: {key} is required"
    if not loc:  # a check across the section's fields; DeepSpeed's message may name the key itself
        return f"{source}: {msg}" if msg.startswith(f"{section}.") else f"{source}: {section}: {msg}"
    if msg.startswith(f"{key} "):  # "fp16.loss_scale must be >= 0 (...)"
        return f"{source}: {key}={show(err['input'])} {msg.removeprefix(f'{key} ')}"
    if msg.startswith("Input should be "):
        msg = "must be " + dedupe_choices(msg.removeprefix("Input should be "))
        return f"{source}: {key}={show(err['input'])} {msg}"
    if msg.startswith("Input is "):
        return f"{source}: {key}={show(err['input'])} {msg.removeprefix('Input ')}"
    return f"{source}: {key}={show(err['input'])}: {msg}"


def dedupe_choices(text: str) -> str:
    """'0, 1, 2, 3 or 3' (ZeroStageEnum lists max_stage too) → '0, 1, 2 or 3'."""
    head, sep, last = text.rpartition(" or ")
    if not sep:
        return text
    seen = list(dict.fromkeys([*head.split(", "), last]))
    return ", ".join(seen[:-1]) + " or " + seen[-1] if len(seen) > 1 else seen[0]


def model_keys(model: type, loc: tuple) -> list[str]:
    """Field names and aliases of the (nested) model at `loc`, for a did-you-mean."""
    import typing

    for part in loc:
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return []
        nested = [
            a for a in (field.annotation, *typing.get_args(field.annotation)) if hasattr(a, "model_fields")
        ]
        if not nested:
            return []
        model = nested[0]
    return [k for name, f in model.model_fields.items() for k in (name, f.alias) if k]


def deepspeed_refusal(cfg: dict[str, Any], source: str) -> list[str]:
    """What DeepSpeedConfig itself still refuses (its asserts and ValueErrors), as lines.

    Run when every other check passed: it catches what those do not know about. train_batch_size is
    left out because DeepSpeedConfig checks it against a world size it cannot know before the process
    group exists; ds_config checks it against the launcher's.
    """
    from pydantic import ValidationError

    probe = copy.deepcopy({k: v for k, v in cfg.items() if k != "train_batch_size"})
    try:
        parse_deepspeed_config(probe)
    except ValidationError as e:  # a section this module has no model for
        return [
            f"{source}: DeepSpeed's {e.title} refuses {show(err['input'])}: {err['msg']}"
            for err in e.errors()
        ]
    except Exception as e:  # whatever DeepSpeed raises here would end every rank in a traceback
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"{source}: DeepSpeed refuses this config: {text}"]
    return []


# --- how DeepSpeed reads the switches the trainer needs ---------------------------------------------------

TRUE_STRINGS = frozenset(["1", "on", "t", "true", "y", "yes"])  # pydantic's lax booleans


def zero_stage(cfg: dict[str, Any]) -> int:
    """The ZeRO stage as DeepSpeed's model reads it ("auto" and absent: 0); 0 for a value it refuses,
    which the checks here report."""
    zero = cfg.get("zero_optimization")
    v = zero.get("stage", 0) if isinstance(zero, dict) else 0
    try:
        stage = 0 if v == AUTO else int(v)
    except (TypeError, ValueError):
        return 0
    return stage if 0 <= stage <= 3 else 0


def precision_enabled(cfg: dict[str, Any], key: str) -> bool:
    """fp16.enabled or bf16.enabled as DeepSpeed's model reads it: "auto" is dropped (off), "false" is off."""
    section = cfg.get(key)
    if key == "bf16" and section is None:
        section = cfg.get("bfloat16")  # DeepSpeed's older name, read when bf16 is absent
    v = section.get("enabled", False) if isinstance(section, dict) else False
    if isinstance(v, str):
        return v.strip().lower() in TRUE_STRINGS
    return v is True or (type(v) is int and v == 1)


def offload_device(cfg: dict[str, Any], section: str = "offload_optimizer") -> Any:
    """The device of zero_optimization.<section> ("cpu", "nvme", "none"), or None where it is not set."""
    zero = cfg.get("zero_optimization")
    off = zero.get(section) if isinstance(zero, dict) else None
    return off.get("device") if isinstance(off, dict) else None


# --- optimizer ------------------------------------------------------------------------------------------


def optimizer_class(name: str, params: dict[str, Any], cfg: dict[str, Any]) -> tuple[type | None, set, set]:
    """What DeepSpeed builds for optimizer.type `name` in this layout (engine._configure_basic_optimizer):
    the class, the params DeepSpeed takes out before calling it, and the arguments it passes itself.
    The class is None for DeepSpeed optimizers whose arguments are not checked here (mup's, Muon).
    Raises KeyError for a name DeepSpeed does not know."""
    import torch

    lname, on_cpu = name.lower(), offload_device(cfg) in ("cpu", "nvme")
    if lname in ("adam", "adamw"):
        popped = {"adam_w_mode", "torch_adam", "fp32_optimizer_states"}
        if params.get("torch_adam") is True:
            adamw = lname == "adamw" or params.get("adam_w_mode", True)
            return (torch.optim.AdamW if adamw else torch.optim.Adam), popped | {"foreach"}, {"foreach"}
        if on_cpu:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam, popped, {"adamw_mode", "fp32_optimizer_states"}
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam, popped, {"adam_w_mode"}
    if lname in ("adagrad", "lamb", "lion"):
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad
        from deepspeed.ops.lamb import FusedLamb
        from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion

        cpu = {"adagrad": DeepSpeedCPUAdagrad, "lamb": FusedLamb, "lion": DeepSpeedCPULion}
        device = {"adagrad": torch.optim.Adagrad, "lamb": FusedLamb, "lion": FusedLion}
        return (cpu if on_cpu else device)[lname], set(), set()
    if lname in builtin_optimizer_names():
        return None, set(), set()
    cls = getattr(torch.optim, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
        return cls, set(), set()
    raise KeyError(name)


def optimizer_names() -> list[str]:
    import torch

    torch_names = [
        n
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
    ]
    # torch's spelling first, so a typo of AdamW is answered "AdamW" rather than DeepSpeed's "adamw"
    return sorted(set(torch_names) - {"Optimizer"}) + sorted(builtin_optimizer_names())


def signature_problems(
    cls: type, given: dict, popped: set, passed: set, prefix: str, source: str
) -> list[str]:
    """Parameter names `cls` would refuse (a TypeError inside deepspeed.initialize), and required ones missing."""
    try:
        sig = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, params/optimizer
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in sig):
        return []
    named = {p.name for p in sig if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted = (named - passed) | popped
    context = f": DeepSpeed builds {cls.__name__} here"
    out = [unknown_key(k, accepted, prefix, source, "it takes", context) for k in given if k not in accepted]
    for p in sig:
        if p.default is p.empty and p.name in named - passed and p.name not in given:
            out.append(f"{source}: {prefix}{p.name} is required by {cls.__name__}; set it")
    return out


def optimizer_problems(cfg: dict[str, Any], source: str) -> list[str]:
    opt = cfg.get("optimizer")
    if opt is None:
        return []
    name, params = opt.get("type"), opt.get("params", {})
    out = unknown_key_problems(opt, ("type", "params", "legacy_fusion"), "optimizer.", source, "DeepSpeed")
    out += rule_problems(params, OPTIMIZER_RULES, "optimizer.params.", source)
    if "max_grad_norm" in params:  # DeepSpeed raises on it in _configure_basic_optimizer
        out.append(
            f"{source}: optimizer.params.max_grad_norm is not supported by DeepSpeed; use the top-level "
            '"gradient_clipping" instead'
        )
    if not isinstance(name, str):
        return out + [
            f'{source}: optimizer.type={show(name)} must be an optimizer name, e.g. "AdamW" or "SGD"'
        ]
    try:
        cls, popped, passed = optimizer_class(name, params, cfg)
    except KeyError:
        close = closest(name, optimizer_names())
        hint = (
            f"did you mean {show(close)}?"
            if close
            else "use one of DeepSpeed's (e.g. AdamW) or torch.optim's (e.g. SGD)"
        )
        return out + [
            f"{source}: optimizer.type={show(name)} is neither a DeepSpeed optimizer nor one of torch.optim; {hint}"
        ]
    if cls is None:
        return out
    given = {k: v for k, v in params.items() if k != "max_grad_norm"}
    out += signature_problems(cls, given, popped, passed, "optimizer.params.", source)
    stage = zero_stage(cfg)
    untested = cls not in zero_supported_optimizers()  # DeepSpeed asserts in _do_optimizer_sanity_check
    if stage and cfg.get("zero_allow_untested_optimizer") is not True and untested:
        out.append(
            f"{source}: optimizer.type={show(name)} builds {cls.__name__}, which DeepSpeed has not tested "
            f'with ZeRO (zero_optimization.stage={stage}); add "zero_allow_untested_optimizer": true to use it'
        )
    return out


# --- scheduler ------------------------------------------------------------------------------------------


def scheduler_class(name: Any) -> type | None:
    """The class DeepSpeed builds for scheduler.type (engine._scheduler_from_config), or None if unknown."""
    import torch

    if not isinstance(name, str):
        return None
    if ds_class := deepspeed_scheduler_class(name):
        return ds_class
    cls = getattr(torch.optim.lr_scheduler, name, None)
    base = torch.optim.lr_scheduler.LRScheduler
    return cls if isinstance(cls, type) and issubclass(cls, base) and cls is not base else None


def run_length(run: RunConfig) -> str:
    """Where the run's number of steps comes from, for messages."""
    train = run.train
    if train.max_steps is not None:
        return f"train.max_steps={train.max_steps}"
    return f"train.epochs={train.epochs}" if train.epochs is not None else "the default length"


def scheduler_problems(cfg: dict[str, Any], source: str, run: RunConfig, steps: int) -> list[str]:
    sched = cfg.get("scheduler")
    if sched is None:
        return []
    name, params = sched.get("type"), sched.get("params", {})
    out = unknown_key_problems(sched, ("type", "params", COSINE_FROM), "scheduler.", source, "DeepSpeed")
    cls, cosine = scheduler_class(name), name == "WarmupCosineLR"
    if cls is None:  # its parameters mean nothing until the type is known
        valid = valid_schedule_names()
        close = closest(name, valid)
        hint = f"did you mean {show(close)}?" if close else f"use one of {', '.join(valid)}"
        return out + [
            f"{source}: scheduler.type={show(name)} is neither a DeepSpeed scheduler nor one of "
            f"torch.optim.lr_scheduler; {hint}"
        ]
    # ds_config resolves and checks these two for WarmupCosineLR, and reports "auto" left for the others;
    # checked here too they would be said twice.
    resolved = ("total_num_steps", "warmup_num_steps") if cosine else ()
    rules = {k: rule for k, rule in SCHEDULER_RULES.items() if k not in resolved}
    out += rule_problems({k: v for k, v in params.items() if v != AUTO}, rules, "scheduler.params.", source)
    out += signature_problems(cls, params, set(), set(), "scheduler.params.", source)
    warmup = params.get("warmup_num_steps")
    # DeepSpeed's floor of 2 warm-up steps is no mistake of the user's, even in a 1-step run.
    if type(warmup) is int and warmup > max(steps, MIN_WARMUP_STEPS):
        key = (
            "train.warmup_steps"
            if cosine and run.train.warmup_steps is not None
            else "scheduler.params.warmup_num_steps"
        )
        auto = ' or "auto" (10% of the run)' if cosine and key.startswith("scheduler") else ""
        out.append(
            f"{source}: {key}={warmup} is longer than the run's {steps} steps ({run_length(run)}), so the "
            f"learning rate never reaches its peak; set it to at most {steps}{auto}"
        )
    return out


# --- everything together --------------------------------------------------------------------------------


def json_problems(cfg: dict[str, Any], source: str, run: RunConfig, steps: int) -> list[str]:
    """Every problem of the resolved JSON that DeepSpeed would raise on once the process group exists, or
    would quietly train with. `steps` is the schedule's length in steps of the full global batch."""
    out = model_problems(cfg, source)
    out += rule_problems(cfg, TOP_LEVEL_RULES, "", source)
    for section, rules in SECTION_RULES.items():
        values = cfg.get(section, {})
        out += rule_problems(values, rules, f"{section}.", source)
        if section in CLOSED_SECTIONS:
            out += unknown_key_problems(values, rules, f"{section}.", source, f"DeepSpeed's {section}")
    out += optimizer_problems(cfg, source)
    out += scheduler_problems(cfg, source, run, steps)
    if "compile" in cfg and not run.train.compile:  # DeepSpeed reads it only inside engine.compile()
        out.append(
            f"{source}: compile tunes torch.compile, which is off; set train.compile true or remove it"
        )
    return out
