"""The DeepSpeed JSON a plan suggests: the ds_configs/ candidates, cheapest first, and how a plan fills them in."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ds_trainer.planning.figures import Layout

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"

# The section a suggestion turns checkpointing on with is the shipped one, so the planner suggests
# exactly what users run (its "auto" becomes one checkpoint per block when the JSON is resolved).
ACTIVATION_CHECKPOINTING_SECTION: dict[str, Any] = json.loads(
    (DS_CONFIGS / "zero1_activation_checkpointing.json").read_text()
)["activation_checkpointing"]

CANDIDATES: tuple[tuple[str, Layout, bool], ...] = (
    ("zero0", Layout(0), False),
    ("zero1", Layout(1), False),
    ("zero2", Layout(2), False),
    ("zero0", Layout(0), True),
    ("zero1", Layout(1), True),
    ("zero2", Layout(2), True),
    ("zero3", Layout(3), False),
    ("zero3", Layout(3), True),
    ("zero2_offload_cpu", Layout(2, "cpu"), False),
    ("zero2_offload_cpu", Layout(2, "cpu"), True),
    ("zero3_offload_cpu", Layout(3, "cpu", "cpu"), False),
    ("zero3_offload_cpu", Layout(3, "cpu", "cpu"), True),
    ("zero3_offload_nvme", Layout(3, "nvme", "nvme"), False),
    ("zero3_offload_nvme", Layout(3, "nvme", "nvme"), True),
)
"""(ds_configs/ file, layout, activation checkpointing), cheapest first; docs/planning.md explains the order."""


def load_base(name: str) -> dict[str, Any]:
    return json.loads((DS_CONFIGS / f"{name}.json").read_text())


def layout_ds_config(layout: Layout) -> tuple[str, dict[str, Any]]:
    """The ds_configs/ file closest to `layout` and its JSON, offload sections adjusted to match."""
    exact = {c[1]: c[0] for c in CANDIDATES}
    if layout in exact:
        return exact[layout], load_base(exact[layout])
    name = f"zero{layout.stage}"
    cfg = load_base(name)
    zero = cfg["zero_optimization"]
    nvme = load_base("zero3_offload_nvme")["zero_optimization"]
    for section, device in (
        ("offload_optimizer", layout.offload_optimizer),
        ("offload_param", layout.offload_params),
    ):
        if device == "cpu":
            zero[section] = {"device": "cpu", "pin_memory": "auto"}
        elif device == "nvme":
            zero[section] = copy.deepcopy(nvme[section])
    return name, cfg


def suggested_ds_config(
    base: dict[str, Any],
    dtype: str,
    activation_checkpointing: bool,
    micro_batch: int,
    gradient_accumulation_steps: int | None = None,
) -> dict[str, Any]:
    """`base` (a ds_configs/ JSON) with the dtype, micro batch and checkpointing section of a plan.

    The micro batch is written as a number (the plan depends on it); gradient accumulation only when
    the micro batch was lowered, to keep the per-GPU batch; everything else stays "auto".
    """
    fp16_section = load_base("zero1_fp16")["fp16"]
    out: dict[str, Any] = {}
    placed = False
    for key, value in base.items():
        if key in ("bf16", "bfloat16", "fp16"):
            if not placed:
                placed = True
                if dtype == "bf16":
                    out["bf16"] = {"enabled": True}
                elif dtype == "fp16":
                    out["fp16"] = copy.deepcopy(fp16_section)
            continue
        out[key] = copy.deepcopy(value)
    if not placed and dtype != "fp32":
        out["bf16" if dtype == "bf16" else "fp16"] = (
            {"enabled": True} if dtype == "bf16" else copy.deepcopy(fp16_section)
        )
    out["train_micro_batch_size_per_gpu"] = micro_batch
    if gradient_accumulation_steps is not None:
        out["gradient_accumulation_steps"] = gradient_accumulation_steps
    out.pop("activation_checkpointing", None)
    if activation_checkpointing:
        out["activation_checkpointing"] = copy.deepcopy(ACTIVATION_CHECKPOINTING_SECTION)
    return out
