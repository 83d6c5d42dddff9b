"""Every place ds_trainer depends on DeepSpeed's internals (checked against DeepSpeed 0.19.8).

Private attributes, `deepspeed.runtime.*` imports, monkeypatches and workarounds for DeepSpeed behaviour
live here and nowhere else, so upgrading DeepSpeed means reading one file. Each function says which
behaviour it relies on; `RELIED_ON` names every module attribute used, and tests/test_ds_internals.py
fails loudly when an upgrade removes one of them.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# "module:attribute" for everything below that a DeepSpeed upgrade could take away.
RELIED_ON = (
    "deepspeed.runtime.pipe.engine:PipelineEngine",
    "deepspeed.runtime.pipe.module:PipelineModule._partition_layers",
    "deepspeed.runtime.pipe.module:PipelineModule._set_bounds",
    "deepspeed.runtime.lr_schedules:WarmupCosineLR",
    "deepspeed.runtime.lr_schedules:VALID_LR_SCHEDULES",
    "deepspeed.runtime.config:DeepSpeedConfig",
    "deepspeed.runtime.config:DEEPSPEED_OPTIMIZERS",
    "deepspeed.runtime.config:HybridEngineConfig",
    "deepspeed.runtime.zero.utils:ZERO_SUPPORTED_OPTIMIZERS",
    "deepspeed.runtime.zero.config:DeepSpeedZeroConfig",
    "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "deepspeed.runtime.precision_config:DeepSpeedFP16Config",
    "deepspeed.runtime.zero.stage_1_and_2:estimate_zero2_model_states_mem_needs",
    "deepspeed.runtime.zero.stage3:estimate_zero3_model_states_mem_needs",
    "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3",
    "deepspeed.checkpoint.ds_to_universal:main",
    "deepspeed.ops.adam:FusedAdam",
    "deepspeed.comm.config:CommsLoggerConfig",
    "deepspeed.compile.config:CompileConfig",
    "deepspeed.monitor.config:TensorBoardConfig",
)

# Attributes a DeepSpeed object sets on itself when built (not visible on the class).
RELIED_ON_INSTANCE = {"deepspeed.ops.adam:FusedAdam": ("multi_tensor_adam", "_dummy_overflow_buf")}


# --- optimizer and schedule ----------------------------------------------------------------------------


def innermost_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 / fp16 wrappers, which keep it as `.optimizer`."""
    return next(opt for opt in optimizer_chain(engine) if isinstance(opt, torch.optim.Optimizer))


def optimizer_chain(engine: Any) -> Iterator[Any]:
    """The engine's optimizer and each one it wraps, outermost first: DeepSpeed's ZeRO, bf16 and fp16
    wrappers keep the optimizer they wrap as `.optimizer`."""
    opt = engine.optimizer
    while opt is not None:
        yield opt
        opt = getattr(opt, "optimizer", None)


@contextmanager
def updates_withheld(engine: Any) -> Iterator[None]:
    """engine.step() runs its boundary bookkeeping (gradients cleared, counters and scheduler advanced)
    while the optimizer applies nothing: weights, moments and Adam's step count stay unchanged.

    Relies on every DeepSpeed wrapper (ZeRO 1-3, bf16) updating through the inner optimizer's `step`
    and then copying its fp32 master weights back, which is a no-op when they did not change.
    """
    opt = innermost_optimizer(engine)
    opt.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del opt.step


def set_gradient_clipping(engine: Any, max_norm: float) -> None:
    """Change a built engine's clipping threshold (0: no clipping).

    DeepSpeed 0.19.8 takes `gradient_clipping` once, when the engine is built: ZeRO-0 in fp32 clips with
    the engine's `_config.gradient_clipping` at each step, and every optimizer wrapper (ZeRO 1-3, bf16,
    fp16) keeps its own copy as `clip_grad` (ZeRO 1-2 also save it in, and restore it from, checkpoints).
    Both are set, before every update, by the caller that needs clipping to start later in the run.
    """
    engine._config.gradient_clipping = max_norm
    for opt in optimizer_chain(engine):
        if hasattr(opt, "clip_grad"):
            opt.clip_grad = max_norm


def start_schedule_at_zero(scheduler: Any) -> None:
    """DeepSpeed's schedulers start at iteration -1 and apply its value (lr 0) to the first update and
    iteration 0's to the second, so two updates are lost at lr 0. Starting at 0 makes step k use
    iteration k, which is what the schedule's formula describes."""
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", None) == -1:
        scheduler.step(0)


def schedule_position(scheduler: Any, default: float) -> float:
    """The iteration a DeepSpeed scheduler is at (its `last_batch_iteration`)."""
    return getattr(scheduler, "last_batch_iteration", default)


COSINE_FROM = "cosine_from"
"""The key in the JSON's scheduler section saying where WarmupCosineLR's cosine counts from (ds_trainer's; DeepSpeed
reads only `type` and `params`): "warmup_end" (the books' formula) or "deepspeed" (DeepSpeed's own count)."""


@functools.cache
def _cosine_from_warmup_end() -> type:
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    class CosineFromWarmupEnd(WarmupCosineLR):
        """DeepSpeed's WarmupCosineLR with the books' cosine: iteration k >= w is at progress (k - w) / (T - w),
        so the first step after the warm-up trains at the peak and the last step before T above min_lr.
        DeepSpeed's counts (k - w + 1), one step further along. The warm-up, the parameters and the state
        (`last_batch_iteration`) are DeepSpeed's, so checkpoints of either load in the other."""

        def get_lr_ratio(self) -> float:
            k, w = self.last_batch_iteration, self.warmup_num_steps
            if k < w:
                return super().get_lr_ratio()
            progress = min(1.0, (k - w) / max(1, self.total_num_steps - w))
            cosine = (1 + math.cos(math.pi * progress)) / 2
            return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    return CosineFromWarmupEnd


def client_scheduler(config: dict[str, Any]) -> Callable[[Any], Any] | None:
    """What to hand deepspeed.initialize as `lr_scheduler` (DeepSpeed calls it with the optimizer): the books'
    cosine when the resolved JSON's scheduler says `"cosine_from": "warmup_end"`, else None (DeepSpeed builds
    the JSON's scheduler itself). Built from the JSON's own params, so the JSON stays what ran."""
    sched = config.get("scheduler") or {}
    if sched.get(COSINE_FROM) != "warmup_end":
        return None
    cls, params = _cosine_from_warmup_end(), dict(sched.get("params", {}))
    return lambda optimizer: cls(optimizer, **params)


def schedule_lr(config: dict[str, Any], iteration: float) -> float | None:
    """The learning rate the configured scheduler gives at `iteration`, from a fresh instance of it."""
    from deepspeed.runtime import lr_schedules

    sched = config.get("scheduler")
    lr = config.get("optimizer", {}).get("params", {}).get("lr")
    if not sched or lr is None:
        return None
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    build = client_scheduler(config) or (
        lambda o: getattr(lr_schedules, sched["type"])(o, **sched.get("params", {}))
    )
    scheduler = build(opt)
    scheduler.step(iteration)
    return float(scheduler.get_lr()[0])


def replay_cpu_adam_bias_correction(engine: Any) -> int:
    """Make the first update after a resume bitwise equal to the uninterrupted run's (CPU FusedAdam).

    DeepSpeed's CPU Adam kernel keeps beta**t as a float32 running product in one C++ object per
    process (csrc/includes/cpu_adam.h, IncrementStep); a fresh process starting at step t+1 computes
    std::pow(beta, t+1) instead, which can differ in the last bit (beta2=0.95, t=11: 0.5688 vs
    0.56880003), and so does the update. Replaying steps 1..t on a one-element dummy through
    FusedAdam's private `multi_tensor_adam` and `_dummy_overflow_buf` rebuilds the product the
    uninterrupted run had. Returns the step replayed to (0: nothing to do).
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import FusedAdam

    opt = next((o for o in optimizer_chain(engine) if isinstance(o, FusedAdam)), None)
    if opt is None or get_accelerator().device_name() != "cpu":
        return 0
    # The largest count: ZeRO-0 increments only each group's last parameter (FusedAdam.step's loop).
    t = max((int(st["step"]) for st in opt.state.values() if "step" in st), default=0)
    betas = {tuple(g["betas"]) for g in opt.param_groups}
    if t == 0 or len(betas) != 1:
        return 0  # groups with different betas make the kernel recompute pow() at every step anyway
    (beta1, beta2), group = betas.pop(), opt.param_groups[0]
    bias_correction = 1 if group["bias_correction"] else 0
    for k in range(1, t + 1):
        g, p, m, v = (torch.zeros(1) for _ in range(4))
        opt.multi_tensor_adam(
            2048 * 32, opt._dummy_overflow_buf, [[g], [p], [m], [v]], 0.0, beta1, beta2, group["eps"], k,
            opt.adam_w_mode, bias_correction, 0.0,
        )  # fmt: skip
    return t


def restore_swapped_optimizer_state(engine: Any, load_dir: str, tag: str) -> int:
    """Give the optimizer its state back after loading a checkpoint under NVMe optimizer offload.

    DeepSpeed 0.19.8's load_checkpoint skips the ZeRO optimizer state when the optimizer is offloaded to
    NVMe (engine.py: `if load_zero_checkpoint and not self.zero_nvme_offload_optimizer()`): it copies the
    swapped fp32 weights and Adam moments back (offloaded_tensors/) but not the per-sub-group state that
    says they exist and at which step, nor the sub-groups too small to swap, which live in memory. The next
    step then starts Adam afresh (zero moments, step 1) and overwrites the moment files. This puts the saved
    state back: for swapped sub-groups the step count, and the moments registered as swap files (read at
    the next step); for the others the fp32 weights, the moments and the 16-bit weights made from them.
    Returns the sub-groups restored.
    """
    if not engine.zero_nvme_offload_optimizer():
        return 0
    from deepspeed.runtime.zero.stage3 import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    zero = engine.optimizer
    # DeepSpeed reads only this rank's file (the others' entries are None); index it as DeepSpeed does.
    rank = torch.distributed.get_rank(group=zero.dp_process_group)
    saved = engine._get_all_zero_checkpoints(load_dir, tag)[rank]
    state, fp32_saved = saved[OPTIMIZER_STATE_DICT]["state"], saved[FP32_FLAT_GROUPS]
    zero._set_fp32_optimizer_param_groups()  # the order the state was saved in
    try:
        params = [p for g in zero.optimizer.param_groups for p in g["params"]]
    finally:
        zero._clear_fp32_optimizer_param_groups()
    sub_group = {id(p): i for i, p in enumerate(zero.fp32_partitioned_groups_flat)}
    swapper = zero.optimizer_swapper
    for index, p in enumerate(params):
        i, saved_state = sub_group[id(p)], state.get(index, {})
        info = swapper.swap_params_info.get(p.ds_id)
        if info is None:  # kept in memory: nothing of it was restored
            p.data.copy_(fp32_saved[i])
            zero.optimizer.state[p] = {
                k: v.clone() if torch.is_tensor(v) else v for k, v in saved_state.items()
            }
            zero._reassign_or_swap_out_partitioned_parameters(i)
            continue
        # Moments stand in as zeros of the partition's size (that size makes them swappable); registering
        # them points the swapper at their files, and releasing them leaves the files as the truth.
        zero.optimizer.state[p] = {
            k: torch.zeros(info.numel(), dtype=p.dtype) if torch.is_tensor(v) and v.dim() == 1 else v
            for k, v in saved_state.items()
        }
        swapper._update_param_state_info(info, p)
        info.release_memory()
    return len(params)


def skip_lone_gradient_allreduce(engine: Any) -> None:
    """No gradient all-reduce for a lone data-parallel rank without ZeRO.

    DeepSpeed 0.19.8's stage-0 engine reduces after every backward at a boundary even over a group of
    one (`allreduce_gradients` -> `buffered_allreduce_fallback`): it flattens every gradient into buckets,
    all-reduces them with itself and copies them back, two full passes over the gradients that change
    nothing (a quarter of a GPT-2 124M step on a CPU, benchmarks/throughput.py). `enable_backward_allreduce`
    is the engine's own switch for that reduction; the pipeline engine turns it off the same way.
    """
    if engine.enable_backward_allreduce is not True:  # read first: a renamed attribute fails loudly here
        raise RuntimeError("DeepSpeed's engine.enable_backward_allreduce is not True after initialize")
    engine.enable_backward_allreduce = False


# --- pipeline --------------------------------------------------------------------------------------------


def is_pipeline_engine(engine: Any) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def pipeline_module_with_bounds() -> type:
    """A PipelineModule subclass that also takes explicit layer boundaries (`explicit_bounds`).

    DeepSpeed's partition methods (parameters, uniform, type:regex) cannot say "these blocks on this
    stage"; its private `_partition_layers` computes `parts` and calls `_set_bounds`, so the subclass
    replaces that one step. Built on first use: importing deepspeed.pipe is slow.
    """
    from deepspeed.pipe import PipelineModule

    class PipelineModuleWithBounds(PipelineModule):
        explicit_bounds: list[int] | None = None

        def _partition_layers(self, method: str = "uniform") -> None:
            if self.explicit_bounds is None:
                return super()._partition_layers(method)
            self.parts = self.explicit_bounds
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def local_layer_indices(self) -> range:
            """The indices (in the layer list) of the layers this stage holds."""
            return range(self._local_start, self._local_stop)

    return PipelineModuleWithBounds


# --- DeepSpeed's JSON -------------------------------------------------------------------------------------


def config_section_models() -> dict[str, type]:
    """DeepSpeed's pydantic model for each section that has one, as DeepSpeedConfig builds it."""
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.config import HybridEngineConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {
        "zero_optimization": DeepSpeedZeroConfig,
        "fp16": DeepSpeedFP16Config,
        "bf16": DeepSpeedBF16Config,
        "bfloat16": DeepSpeedBF16Config,
        "tensorboard": TensorBoardConfig,
        "wandb": WandbConfig,
        "csv_monitor": CSVConfig,
        "comet": CometConfig,
        "comms_logger": CommsLoggerConfig,
        "compile": CompileConfig,
        "hybrid_engine": HybridEngineConfig,
    }


def parse_deepspeed_config(config: dict[str, Any]) -> Any:
    """DeepSpeed's own parse of a whole JSON (raises what deepspeed.initialize would)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(config)


def builtin_optimizer_names() -> list[str]:
    """optimizer.type values DeepSpeed builds itself (engine._configure_basic_optimizer)."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return list(DEEPSPEED_OPTIMIZERS)


def zero_supported_optimizers() -> tuple[type, ...]:
    """Optimizer classes ZeRO accepts without `zero_allow_untested_optimizer`."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    return tuple(ZERO_SUPPORTED_OPTIMIZERS)


def deepspeed_scheduler_class(name: str) -> type | None:
    """The class DeepSpeed builds for scheduler.type `name` (engine._scheduler_from_config)."""
    from deepspeed.runtime import lr_schedules

    return getattr(lr_schedules, name, None) if name in valid_schedule_names() else None


def valid_schedule_names() -> list[str]:
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    return list(VALID_LR_SCHEDULES)


def estimate_model_states(stage: int) -> Any:
    """DeepSpeed's model-states memory estimator for ZeRO-2 (stages 1-2) or ZeRO-3; they live in the
    runtime's optimizer modules and only print in their public `_all_cold` forms."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs


# --- universal checkpoints ------------------------------------------------------------------------------

MODEL_STATES_NAMES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def convert_to_universal(source: Path, target: Path, zero_stage: int) -> None:
    """DeepSpeed's ds_to_universal from `source` into `target`, repaired so that ZeRO stage
    `zero_stage` can load it. Raises what the converter raises."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    # DeepSpeed looks for the model-states file under the name the *loading* stage uses (ZeRO-3:
    # zero_pp_rank_0_..., else mp_rank_...), while the converter keeps the saving stage's name.
    for have, want in (MODEL_STATES_NAMES, MODEL_STATES_NAMES[::-1]):
        if (target / have).is_file() and not (target / want).exists():
            os.link(target / have, target / want)
    from_stage3 = bool(list(source.glob("zero_pp_rank_*_model_states.pt")))
    if zero_stage == 3 and not from_stage3:
        _add_stage3_optimizer_entry(source, target)
    elif zero_stage < 3 and from_stage3:
        _add_stage12_layout(source, target)


def _add_stage3_optimizer_entry(source: Path, universal: Path) -> None:
    """ZeRO-3 reads Adam's step and the param groups from an `optimizer_state_dict` entry that the
    converter writes only for ZeRO-3 sources; a ZeRO-1/2 source keeps them in each optimizer shard."""
    shard = torch.load(next(source.glob("*_optim_states.pt")), map_location="cpu", weights_only=False)
    base = shard["optimizer_state_dict"]["base_optimizer_state"]
    path = universal / "zero" / "optimizer_state.pt"
    common = torch.load(path, map_location="cpu", weights_only=False)
    step = next(iter(base["state"].values()))["step"]
    common["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": base["param_groups"]}
    torch.save(common, path)


def _add_stage12_layout(source: Path, universal: Path) -> None:
    """The converter writes a ZeRO-3 checkpoint in a dialect ZeRO-1/2 cannot read: flat tensors instead
    of {"param": tensor} in the parameter's shape, no step per parameter, and no DeepSpeed version."""
    model_states = torch.load(next(source.glob("zero_pp_rank_0_*_model_states.pt")), weights_only=False)
    shapes = {k: v for group in model_states["param_shapes"] for k, v in group.items()}
    shard = torch.load(next(source.glob("*_optim_states.pt")), map_location="cpu", weights_only=False)
    path = universal / "zero" / "optimizer_state.pt"
    common = torch.load(path, map_location="cpu", weights_only=False)
    common.setdefault("ds_version", shard.get("ds_version"))
    step = common["optimizer_state_dict"]["state"][0]["step"]
    torch.save(common, path)
    for name, shape in shapes.items():
        folder = universal / "zero" / name
        for f in folder.glob("*.pt"):
            t = torch.load(f, map_location="cpu", weights_only=False)
            if isinstance(t, torch.Tensor):
                torch.save({"param": t.reshape(shape)}, f)
        torch.save(step, folder / "step.pt")


def saved_param_groups(universal: Path) -> list[dict[str, Any]]:
    common = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    return common["optimizer_state_dict"]["param_groups"]


def restore_stage3_param_groups(engine: Any, saved: list[dict[str, Any]]) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every parameter group the settings of the first one
    (runtime/zero/stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3), so the group without
    weight decay (biases, LayerNorm weights, embeddings) would be decayed from then on. Each group gets
    its own settings back from the checkpoint, as the ZeRO-1/2 load does. The caller has checked that
    the group counts match."""
    for group, settings in zip(innermost_optimizer(engine).param_groups, saved, strict=True):
        group.update({k: v for k, v in settings.items() if k != "params"})


# --- process ------------------------------------------------------------------------------------------------

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"


def shm_buffer_name(uid: int, master_addr: str, master_port: str, rank: str) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce (deepspeed_shm_comm) creates for a rank."""
    return f"{SHM_PREFIX}{uid}_{master_addr}_{master_port}_{rank}"


def cache_cpu_info() -> None:
    """Detect the CPU once per process. Each CPU op DeepSpeed loads (shared-memory all-reduce, Adam)
    asks py-cpuinfo twice for its compiler flags, and each ask starts a subprocess: about 1.2 s of
    CPU time here. Without the cache, a rank starts about 3.6 s later on a 2-core machine."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu instead
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)
