"""A rank's life as a process: joining the process group, leaving it, and ending without teardown.

Also the host-level leftovers of DeepSpeed's CPU all-reduce (a /dev/shm buffer per rank), which a
rank releases as soon as its peers have mapped it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

import deepspeed
import torch
import torch.distributed
from deepspeed.accelerator import get_accelerator

from ds_trainer import ds_internals


def accelerator_name() -> str:
    return get_accelerator().device_name()


def accelerator_device() -> torch.device:
    """This rank's device (set by init_distributed on an accelerator; the CPU otherwise)."""
    return torch.device(get_accelerator().current_device_name())


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on `addr` now (the OS picks it; another process may still take it later)."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group; a plain `python launch/pretrain.py` becomes a group of one."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    # DeepSpeed's INFO lines repeat on every rank and drown the trainer's own log.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    on_cpu = accelerator_name() == "cpu"
    if on_cpu:
        ds_internals.cache_cpu_info()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None)
    if on_cpu:
        release_shm_buffer()
    else:
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def leave_distributed() -> None:
    """Tear the process group down while the interpreter is still whole. Left to interpreter exit,
    gloo's worker threads can still hold work with Python references, and a rank then aborts with
    "terminate called without an active exception" (seen here in about 1 of 20 two-rank runs; see
    pytorch/pytorch#190489), which fails a run that had finished. The groups DeepSpeed still holds
    outlive this call; end_process keeps them from the teardown too."""
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


def release_shm_buffer() -> None:
    """Unlink this rank's shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed's CPU all-reduce creates a 64 MiB /dev/shm file per rank and never removes it, so every
    multi-rank run on a host leaks memory until the host runs out. The mappings outlive the name, and
    the memory goes back when the last rank exits, however it exits.
    """
    if os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        return  # ranks on several hosts: DeepSpeed made no buffer
    torch.distributed.barrier()  # every peer has opened our file by now
    env = os.environ
    name = ds_internals.shm_buffer_name(os.getuid(), env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"])
    (ds_internals.SHM_DIR / name).unlink(missing_ok=True)


def remove_stale_shm_buffers(shm_dir: Path = ds_internals.SHM_DIR) -> list[str]:
    """Delete DeepSpeed all-reduce buffers that no live process maps (left by runs killed during start-up)."""
    files = sorted(shm_dir.glob(ds_internals.SHM_PREFIX + "*"))
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
