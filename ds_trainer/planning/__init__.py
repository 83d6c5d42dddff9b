"""Memory and compute planner: what a GPT run needs per GPU, how long it takes, and a DeepSpeed JSON that fits.

`plan(PlanRequest(...))` is a pure function from a model shape and a machine to a `Plan` (typed figures,
in bytes, FLOPs and seconds); `format_plan` turns it into the table `launch/plan.py` prints. Nothing here
touches a GPU. The formulas, what they were checked against, and the search order are in docs/planning.md.

Modules: request (the input and its checks), shape (model config and parameter count), memory (model
states, activations, buffers), ds_json (the candidate ds_configs/ files and the suggested JSON), planner
(`plan()`), figures (the typed results), report (the table and writing the JSON), constants.
"""

from ds_trainer.planning.constants import GIB
from ds_trainer.planning.ds_json import ACTIVATION_CHECKPOINTING_SECTION
from ds_trainer.planning.figures import Layout, Plan
from ds_trainer.planning.memory import (
    activation_memory,
    deepspeed_estimate,
    model_states,
    zero_paper_states,
)
from ds_trainer.planning.planner import plan
from ds_trainer.planning.report import format_plan, write_suggestion
from ds_trainer.planning.request import PlanRequest
from ds_trainer.planning.shape import count_parameters, model_config

__all__ = [
    "ACTIVATION_CHECKPOINTING_SECTION",
    "GIB",
    "Layout",
    "Plan",
    "PlanRequest",
    "activation_memory",
    "count_parameters",
    "deepspeed_estimate",
    "format_plan",
    "model_config",
    "model_states",
    "plan",
    "write_suggestion",
    "zero_paper_states",
]
