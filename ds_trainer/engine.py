"""Process group and DeepSpeed engine: the one place that calls deepspeed.initialize."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

import deepspeed
import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator

from ds_trainer.ds_config import ResolvedDSConfig
from ds_trainer.model import GPT, GPTConfig


def accelerator_name() -> str:
    return get_accelerator().device_name()


def init_distributed() -> None:
    """Join the launcher's process group; a plain `python launch/pretrain.py` becomes a group of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    # DeepSpeed's INFO lines repeat on every rank and drown the trainer's own log.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if accelerator_name() == "cpu":
        remember_cpu_info()
    dist_backend = "gloo" if accelerator_name() == "cpu" else None
    deepspeed.init_distributed(dist_backend=dist_backend)
    if accelerator_name() != "cpu":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        release_shm_buffer()


def remember_cpu_info() -> None:
    """Detect the CPU once per process. Each CPU op DeepSpeed loads (shared-memory all-reduce, Adam)
    asks py-cpuinfo twice for its compiler flags, and each ask starts a subprocess: about 1.2 s of
    CPU time here. Without the cache, a rank starts about 3.6 s later on a 2-core machine."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu instead
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)


def leave_distributed() -> None:
    """Tear the process group down while the interpreter is still whole. Left to interpreter exit,
    gloo's worker threads can still hold work with Python references, and a rank then aborts with
    "terminate called without an active exception" (seen here in about 1 of 20 two-rank runs; see
    pytorch/pytorch#190489), which fails a run that had finished. The groups DeepSpeed still holds
    outlive this call; end_process keeps them from the teardown too."""
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down while a peer may still talk to it
        torch.distributed.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End a rank with `code` without the interpreter's teardown.

    `destroy_process_group` (in leave_distributed) drops only torch's own references: DeepSpeed keeps
    its groups (data-parallel, ZeRO partition and pipeline groups) alive, so their gloo backends are
    destructed during interpreter finalization, where a gloo worker thread that still holds a tensor
    aborts the rank with "terminate called without an active exception" (signal 6). CI saw it once,
    in a two-rank ZeRO-3 run that had trained and saved: the launcher reported the job as failed,
    and a requeue or error exit code would be replaced the same way. Nothing is left to finalize by
    then: checkpoints are fsynced as written and the metrics files are closed, so only the standard
    streams and logging handlers need flushing.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe must not change the code
            stream.flush()
    os._exit(code)


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"


def release_shm_buffer() -> None:
    """Unlink this rank's shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed's CPU all-reduce creates a 64 MiB /dev/shm file per rank and never removes it, so every
    multi-rank run on a host leaks memory until the host runs out. The mappings outlive the name, and
    the memory goes back when the last rank exits, however it exits.
    """
    if os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        return  # ranks on several hosts: DeepSpeed made no buffer
    torch.distributed.barrier()  # every peer has opened our file by now
    name = f"{SHM_PREFIX}{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{os.environ['RANK']}"
    (SHM_DIR / name).unlink(missing_ok=True)


def remove_stale_shm_buffers(shm_dir: Path = SHM_DIR) -> list[str]:
    """Delete DeepSpeed all-reduce buffers that no live process maps (left by runs killed during start-up)."""
    files = sorted(shm_dir.glob(SHM_PREFIX + "*"))
    if not files:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(None, 5)[-1].strip() for line in maps.read_text().splitlines())
        except OSError:
            continue  # the process ended while we looked
    stale = [f for f in files if str(f) not in mapped]
    for f in stale:
        f.unlink(missing_ok=True)
    return [str(f) for f in stale]


def parameter_groups(model: nn.Module) -> list[dict]:
    """Weight decay only on matrices of linear layers: biases, LayerNorm weights and embeddings get none."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # a tied weight belongs to the embedding that owns it first
            seen.add(id(p))
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(config: GPTConfig, ds: ResolvedDSConfig, partition: str = "parameters") -> nn.Module:
    """The GPT as the DeepSpeed config wants it built.

    Under ZeRO-3 the model is constructed inside zero.Init, so each rank only ever allocates its own
    partition (DeepSpeed gathers a module's parameters around `apply`, which our initialisation uses).
    With pipeline stages it is a GPTPipeline holding only this rank's stage. A JSON
    `activation_checkpointing` section turns on per-block recomputation, tuned by that section.
    """
    checkpoint_blocks = "activation_checkpointing" in ds.config
    if checkpoint_blocks:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds.config)
    if ds.pipeline_stages > 1:
        from ds_trainer.pipeline import GPTPipeline

        return GPTPipeline(config, ds.pipeline_stages, partition, checkpoint_blocks)
    if ds.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds.config):
            model = GPT(config)
    else:
        model = GPT(config)
    if checkpoint_blocks:
        model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    return model


def data_parallel_coords(engine: deepspeed.DeepSpeedEngine) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas; pipeline stages share one."""
    grid = getattr(engine, "grid", None)
    if grid is not None:
        return grid.data_parallel_id, grid.data_parallel_size
    return engine.global_rank, engine.world_size


def build_engine(model: nn.Module, ds: ResolvedDSConfig) -> deepspeed.DeepSpeedEngine:
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model), config=ds.config
    )
    # DeepSpeed applies the value of iteration -1 (lr 0) to the first update and the value of
    # iteration 0 to the second, so two updates are lost at lr 0. Starting the schedule at 0
    # makes step k use iteration k, which is what the schedule's formula describes.
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", None) == -1:
        scheduler.step(0)
    return engine


# DeepSpeed JIT-compiles these on first use. Building them once up front keeps ranks from racing to
# compile (and from leaving a stale lock behind when one is killed mid-build).
PREBUILT_OPS = ("CPUAdamBuilder", "FusedAdamBuilder", "ShareMemCommBuilder", "AsyncIOBuilder")


def build_ops(names: tuple[str, ...] = PREBUILT_OPS) -> dict[str, str]:
    """Compile DeepSpeed's ops for this accelerator; returns each op's outcome ("built" or why not)."""
    results = {}
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            results[name] = "not used on this accelerator"
        elif not builder.is_compatible(verbose=False):
            results[name] = "not compatible here (missing system library?)"
        else:
            builder.load(verbose=False)
            results[name] = "built"
    return results


def remove_stale_build_locks(extensions_dir: str) -> list[str]:
    """Delete `lock` files left by a killed build; without this every later run waits on them forever."""
    locks = list(Path(extensions_dir).rglob("lock"))
    for lock in locks:
        lock.unlink(missing_ok=True)
    return [str(lock) for lock in locks]


def replay_cpu_adam_bias_correction(engine: deepspeed.DeepSpeedEngine) -> int:
    """Make the first update after a resume bitwise equal to the uninterrupted run's (CPU FusedAdam).

    DeepSpeed's CPU Adam kernel keeps beta**t as a float32 running product in one C++ object per
    process (csrc/includes/cpu_adam.h, IncrementStep); a fresh process starting at step t+1 computes
    std::pow(beta, t+1) instead, which can differ in the last bit (beta2=0.95, t=11: 0.5688 vs
    0.56880003), and so does the update. Replaying steps 1..t on a one-element dummy rebuilds the
    product the uninterrupted run had. Returns the step replayed to (0: nothing to do).
    """
    from deepspeed.ops.adam import FusedAdam

    opt = engine.optimizer
    while opt is not None and not isinstance(opt, FusedAdam):
        opt = getattr(opt, "optimizer", None)  # ZeRO and bf16 wrappers hold the real optimizer here
    if opt is None or accelerator_name() != "cpu":
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
