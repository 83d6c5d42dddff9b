"""Host memory and NVMe bytes of the offload layouts on one node, with the offload sizes ds_trainer derives for
that host: what `launch/plan.py --host_memory` prints. The terms are explained in docs/planning.md."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from ds_trainer.errors import Problems, join_problems
from ds_trainer.model import GPTConfig
from ds_trainer.offload import Host, optimizer_bytes, parameter_bytes, resolve_offload, tensors_of
from ds_trainer.planning.constants import DTYPE_BYTES, HOST_PROCESS_BASE, MEMORY_MARGIN, gib
from ds_trainer.planning.ds_json import load_base
from ds_trainer.planning.figures import Layout

HOST_LAYOUTS: tuple[tuple[str, Layout], ...] = (
    ("zero3", Layout(3)),
    ("zero2_offload_cpu", Layout(2, "cpu")),
    ("zero3_offload_cpu", Layout(3, "cpu", "cpu")),
    ("zero3_offload_nvme", Layout(3, "nvme", "nvme")),
)
"""The ds_configs/ files compared on a host, least offloaded first."""


@dataclass(frozen=True)
class HostNeed:
    """One layout on one node: bytes per node (every rank's share added up)."""

    base_file: str
    layout: Layout
    resident: int
    """Peak resident memory: the processes, the offloaded states and buffers, and on a CPU-only machine the
    rank's device-side memory too."""
    pinned: int
    nvme: int
    host_memory: int
    nvme_free: int | None
    """Free bytes at --nvme_path; None when not given (the NVMe column is then not checked)."""
    zero: dict[str, Any] = field(repr=False)
    """The file's zero_optimization section with the derived offload sizes filled in."""
    problems: tuple[str, ...] = ()
    """What the offload rules refuse for this host (explicit values in the file, or a host too small)."""
    gpu_shortfall: str = ""
    """Why the layout does not fit the GPUs (the planner's per-GPU figure); empty when it does or when the
    ranks compute on the CPU."""

    @property
    def fits(self) -> bool:
        return not self.shortfall()

    def shortfall(self) -> str:
        """Why this layout does not fit the host; empty when it does."""
        if self.problems:
            return self.problems[0]
        out = [self.gpu_shortfall] if self.gpu_shortfall else []
        if self.resident > self.host_memory * (1 - MEMORY_MARGIN):
            out.append(
                f"needs {gib(self.resident)} of {gib(self.host_memory * (1 - MEMORY_MARGIN))} GiB usable"
            )
        if self.nvme_free is not None and self.nvme > self.nvme_free * (1 - MEMORY_MARGIN):
            out.append(
                f"NVMe needs {gib(self.nvme)} of {gib(self.nvme_free * (1 - MEMORY_MARGIN))} GiB usable"
            )
        return join_problems(out)


def host_needs(
    cfg: GPTConfig,
    dtype: str,
    host: Host,
    world: int,
    device_bytes: dict[Layout, int] | None = None,
    nvme_path: str | None = None,
    gpu_shortfalls: dict[Layout, str] | None = None,
) -> list[HostNeed]:
    """Each of HOST_LAYOUTS on `host` (its memory and ranks per node) with `world` data-parallel ranks in
    all. `device_bytes` is each layout's per-rank device memory when the ranks compute on the CPU (the host
    holds it too), else None; `gpu_shortfalls` says for each layout why it does not fit the GPUs."""
    w = DTYPE_BYTES[dtype]
    nvme_free = shutil.disk_usage(nvme_path).free if nvme_path else None
    out = []
    for name, layout in HOST_LAYOUTS:
        raw = load_base(name)
        if nvme_path:
            for section in raw["zero_optimization"].values():
                if isinstance(section, dict) and section.get("device") == "nvme":
                    section["nvme_path"] = nvme_path
        zero = raw["zero_optimization"]
        problems = Problems()
        resolve_offload(raw, name, cfg, w, world, host, problems)
        t = tensors_of(zero, cfg, world)
        opt, par = optimizer_bytes(zero, t, w), parameter_bytes(zero, t, w)
        pinned = opt.pinned(zero.get("offload_optimizer", {}).get("pin_memory")) + par.pinned(
            zero.get("offload_param", {}).get("pin_memory")
        )
        device = (device_bytes or {}).get(layout, 0)
        per_rank = HOST_PROCESS_BASE + opt.resident + par.resident + device
        out.append(
            HostNeed(
                name,
                layout,
                per_rank * host.ranks,
                pinned * host.ranks,
                (opt.nvme + par.nvme) * host.ranks,
                host.memory_bytes,
                nvme_free,
                zero,
                tuple(problems.items),
                (gpu_shortfalls or {}).get(layout, ""),
            )
        )
    return out
