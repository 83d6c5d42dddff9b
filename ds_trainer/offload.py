"""ZeRO-3 offload sizes derived from the model and the host: the JSON's "auto" values for them, and the
explicit values that cannot work, as one line each.

DeepSpeed sizes its offload buffers from numbers it cannot know are wrong for the model: the optimizer's
NVMe swapper pins `offload_optimizer.buffer_count` buffers of the largest sub-group (`sub_group_size`, default
1e9 elements: 16 GB of pinned fp32 at the default 4 buffers); the parameter swapper holds one parameter per
buffer of `offload_param.buffer_size` elements, and prefetching and the reuse cache keep more parameters
in flight than its `buffer_count` (it then asserts "Not enough buffers 0 for swapping 1"). The rules, and
how each figure follows from the model and the host, are in docs/planning.md ("Offload sizes").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_trainer.ds_rules import AUTO, show
from ds_trainer.errors import DsTrainerError, Problems
from ds_trainer.model import GPTConfig, parameter_sizes

GIB = 2**30

# DeepSpeed's defaults (DeepSpeedZeroConfig and its offload models, 0.19), used where the JSON leaves a key out.
DS_PERSISTENCE_THRESHOLD = 100_000
DS_SUB_GROUP = 1_000_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_MAX_REUSE_DISTANCE = 1_000_000_000
DS_PARAM_BUFFER_COUNT = 5
DS_PARAM_BUFFER_SIZE = 100_000_000
DS_MAX_IN_CPU = 1_000_000_000

OPTIMIZER_SWAP_TENSORS = 4
"""Buffers the optimizer's NVMe swapper takes per sub-group: fp32 weights, Adam's two moments, gradients."""
SWAPPER_HEADROOM = 3
"""Parameter-swapper buffers beyond what prefetching and the reuse cache hold: the module being computed,
the one being released while the next is read, and the tied embedding used twice."""
OPTIMIZER_SWAP_SHARE = 1 / 16
"""Share of a rank's host memory the optimizer's pinned swap buffers may take (1.5 GiB on a 24 GiB host)."""
PIN_SHARE = 1 / 2
"""Share of a rank's host memory pinned (page-locked) buffers may take before "auto" turns pinning off."""
PARAMS_IN_CPU_SHARE = 1 / 8
"""Share of a rank's host memory NVMe-offloaded parameters may keep in CPU memory (`max_in_cpu` "auto"). An
eighth, not more: the rank's reduced gradients stay in host memory beside them in the same dtype, and a
quarter kept all of gpt2-xl's fp32 weights there (5.8 GiB) and peaked above 16 GB on a 24 GiB host."""


@dataclass(frozen=True)
class Host:
    """The memory of the machine the ranks run on, and how many ranks share it."""

    memory_bytes: int
    ranks: int = 1

    @property
    def share(self) -> int:
        """Host memory per rank."""
        return self.memory_bytes // max(1, self.ranks)

    @classmethod
    def detect(cls, memory_gb: float | None = None) -> Host:
        """This machine: `memory_gb` (GiB) if given, else its RAM or its cgroup's limit, whichever is lower;
        the launcher's ranks per node."""
        # torchrun says LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE.
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        if memory_gb is not None:
            return cls(int(memory_gb * GIB), ranks)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(min(total, _cgroup_limit() or total), ranks)


def parse_memory(text: str, name: str) -> int:
    """Bytes of a size like 24GB, 24GiB, 512MB or 24 (GiB); GB and GiB both mean 2**30, as tools that
    report memory do."""
    units = {
        "": GIB,
        "g": GIB,
        "gb": GIB,
        "gib": GIB,
        "m": 2**20,
        "mb": 2**20,
        "mib": 2**20,
        "t": 2**40,
        "tb": 2**40,
    }
    number = text.strip().lower().rstrip("bgimt")
    unit = text.strip().lower()[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise DsTrainerError(f"{name}={text!r} is not a memory size; write it like 24GB, 24GiB or 512MB")
    return int(value * units[unit])


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


@dataclass(frozen=True)
class Tensors:
    """What the offload rules need of the model, per rank: its parameters as ZeRO-3 partitions them."""

    largest: int
    """Elements of the largest parameter's partition on one rank (the token embedding, tied to the head)."""
    smallest_swapped: int
    """Elements of the smallest whole parameter the parameter swapper moves: prefetching and the reuse cache
    count whole parameters (below the persistence threshold parameters stay on every rank, never swapped)."""
    total: int
    """Elements of all parameter partitions on one rank."""
    swapped: int
    """How many parameters the parameter swapper moves: more buffers than that are never needed."""

    @classmethod
    def of(cls, cfg: GPTConfig, ranks: int, persistence_threshold: int) -> Tensors:
        block, outer = parameter_sizes(cfg)
        sizes = block * cfg.n_layer + outer
        swapped = [n for n in sizes if n >= persistence_threshold]
        partitions = sum(_partition(n, ranks) for n in sizes)
        return cls(_partition(max(sizes), ranks), min(swapped or sizes), partitions, len(swapped))


def _partition(numel: int, ranks: int) -> int:
    """Elements of one rank's ZeRO-3 partition of a parameter."""
    return math.ceil(numel / ranks)


def resolve_offload(
    cfg: dict[str, Any],
    source: str,
    model: GPTConfig,
    dtype_bytes: int,
    ranks: int,
    host: Host,
    problems: Problems,
) -> None:
    """Fill the "auto" offload sizes of a JSON in place and add a line for each explicit one that cannot
    work. `ranks` are the data-parallel ranks a parameter is partitioned over."""
    zero = cfg.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    rules = _Rules(source, tensors_of(zero, model, ranks), dtype_bytes, host, problems)
    rules.optimizer(zero, _section(zero, "offload_optimizer"))
    rules.parameters(zero, _section(zero, "offload_param"))


def tensors_of(zero: dict[str, Any], model: GPTConfig, ranks: int) -> Tensors:
    threshold = zero.get("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD)
    if not _is_int(threshold):
        threshold = DS_PERSISTENCE_THRESHOLD  # DeepSpeed's model reports the value
    return Tensors.of(model, ranks, threshold)


@dataclass(frozen=True)
class SectionBytes:
    """What one offload section holds per rank, in bytes: in host memory (`resident`, of which DeepSpeed
    pins the swappers' buffers whatever pin_memory says, `always_pinned`, and pin_memory true the rest it
    names, `pinnable`) and on NVMe."""

    resident: int
    always_pinned: int
    pinnable: int
    nvme: int

    def pinned(self, pin_memory: Any) -> int:
        """Bytes pinned with this pin_memory setting."""
        return self.always_pinned + (self.pinnable if pin_memory is True else 0)


NOT_OFFLOADED = SectionBytes(0, 0, 0, 0)


def optimizer_bytes(zero: dict[str, Any], t: Tensors, w: int) -> SectionBytes:
    """The offloaded optimizer of a resolved zero_optimization section (DeepSpeed 0.19's stage3.py, and
    measured: benchmarks/offload_scale.py). At ZeRO-3 the reduced gradients of the rank's partition stay in
    host memory either way, in the model's dtype (grad_partitions_flat_buffer); on the CPU the fp32 weights,
    Adam's moments and each sub-group's fp32 gradient buffer join them (16 bytes per element; at ZeRO-1/2
    the fp32 gradients and a 16-bit staging copy instead); on NVMe the fp32 states are swapped through
    buffer_count buffers of a sub-group, and one sub-group's fp32 gradient buffer stays."""
    opt = _section(zero, "offload_optimizer")
    sub_group = min(zero.get("sub_group_size", DS_SUB_GROUP), t.total)
    if opt.get("device") == "cpu":
        held = 16 * t.total + w * t.total
        return SectionBytes(resident=held, always_pinned=0, pinnable=held, nvme=0)
    if opt.get("device") != "nvme":
        return NOT_OFFLOADED
    buffers = opt.get("buffer_count", OPTIMIZER_SWAP_TENSORS) * sub_group * 4
    grads = w * t.total + 4 * sub_group
    return SectionBytes(resident=grads + buffers, always_pinned=buffers, pinnable=grads, nvme=16 * t.total)


def parameter_bytes(zero: dict[str, Any], t: Tensors, w: int) -> SectionBytes:
    """The offloaded 16-bit parameters: all in host memory on the CPU; on NVMe, max_in_cpu of them stay in
    host memory and the rest pass through buffer_count buffers of buffer_size."""
    par = _section(zero, "offload_param")
    if par.get("device") == "cpu":
        return SectionBytes(resident=w * t.total, always_pinned=0, pinnable=w * t.total, nvme=0)
    if par.get("device") != "nvme":
        return NOT_OFFLOADED
    kept = w * min(par.get("max_in_cpu", DS_MAX_IN_CPU), t.total)
    buffers = (
        par.get("buffer_count", DS_PARAM_BUFFER_COUNT) * par.get("buffer_size", DS_PARAM_BUFFER_SIZE) * w
    )
    return SectionBytes(resident=kept + buffers, always_pinned=buffers, pinnable=kept, nvme=w * t.total)


class _Rules:
    def __init__(self, source: str, tensors: Tensors, w: int, host: Host, problems: Problems) -> None:
        self.source, self.t, self.w, self.host, self.problems = source, tensors, w, host, problems
        self.pin_left = int(host.share * PIN_SHARE)  # what "auto" may still pin

    def optimizer(self, zero: dict[str, Any], opt: dict[str, Any]) -> None:
        """sub_group_size and the optimizer swapper's buffers; pinning of the offloaded states."""
        on_nvme = opt.get("device") == "nvme"
        count = _fill(opt, "buffer_count", OPTIMIZER_SWAP_TENSORS)
        if on_nvme and _is_int(count) and count < OPTIMIZER_SWAP_TENSORS:
            self._add(
                f"zero_optimization.offload_optimizer.buffer_count={count} is below the {OPTIMIZER_SWAP_TENSORS} "
                "buffers DeepSpeed's NVMe swapper takes per sub-group (fp32 weights, two Adam moments, "
                f'gradients); set it to {OPTIMIZER_SWAP_TENSORS} or "auto"'
            )
        budget = int(self.host.share * OPTIMIZER_SWAP_SHARE) // (
            4 * count if _is_int(count) and count > 0 else 16
        )
        sub = _fill(zero, "sub_group_size", max(1, min(DS_SUB_GROUP, budget)) if on_nvme else DS_SUB_GROUP)
        if not (_is_int(sub) and _is_int(count)):
            return  # DeepSpeed's model reports the type
        held = optimizer_bytes(zero, self.t, self.w)
        if on_nvme:
            self._beyond_host(
                held.always_pinned,
                f"{count} optimizer swap buffers of sub_group_size={sub} fp32 elements",
                "sub_group_size lower",
            )
        self._pin(opt, "offload_optimizer", held)

    def parameters(self, zero: dict[str, Any], par: dict[str, Any]) -> None:
        """The parameter swapper's buffers, prefetching and reuse within them, and parameters kept in CPU memory."""
        if par.get("device") != "nvme":
            for key, default in (
                ("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET),
                ("stage3_max_reuse_distance", DS_MAX_REUSE_DISTANCE),
            ):
                _fill(zero, key, default)
            for key, default in (
                ("buffer_count", DS_PARAM_BUFFER_COUNT),
                ("buffer_size", DS_PARAM_BUFFER_SIZE),
                ("max_in_cpu", DS_MAX_IN_CPU),
            ):
                _fill(par, key, default)
            self._pin(par, "offload_param", parameter_bytes(zero, self.t, self.w))
            return
        derived = par.get("buffer_count") == AUTO
        size = _fill(par, "buffer_size", self.t.largest)
        if _is_int(size) and size < self.t.largest:
            self._add(
                f"zero_optimization.offload_param.buffer_size={size} is smaller than the largest parameter "
                f"(the token embedding, {self.t.largest:,} elements on each rank); set it to {self.t.largest} "
                'or "auto"'
            )
        count = _fill(par, "buffer_count", DS_PARAM_BUFFER_COUNT)
        m = self.t.smallest_swapped
        spare = max(0, count - SWAPPER_HEADROOM) if _is_int(count) else 0
        prefetch = _fill(zero, "stage3_prefetch_bucket_size", spare * m)
        reuse = _fill(zero, "stage3_max_reuse_distance", 0)
        if _is_int(count) and _is_number(prefetch) and _is_number(reuse):
            needed = min(SWAPPER_HEADROOM + math.ceil(prefetch / m) + math.ceil(reuse / m), self.t.swapped)
            if count < needed:
                self._add(
                    f"zero_optimization.offload_param.buffer_count={count} holds {count} parameters, but "
                    f"stage3_prefetch_bucket_size={show(prefetch)} and stage3_max_reuse_distance={show(reuse)} can "
                    f"keep {needed} in flight (parameters of {m:,} elements); set buffer_count to {needed}, or "
                    'both to "auto"'
                )
        keep = int(self.host.share * PARAMS_IN_CPU_SHARE) // self.w
        kept = _fill(par, "max_in_cpu", min(self.t.total, keep))
        if not all(_is_int(v) for v in (count, size, kept)):
            return
        held = parameter_bytes(zero, self.t, self.w)
        fix = "train.host_memory_gb to the host's memory, or fewer ranks per node," if derived else ""
        self._beyond_host(
            held.always_pinned,
            f"{count} parameter swap buffers of buffer_size={size}",
            fix or "buffer_count lower",
        )
        self._pin(par, "offload_param", held)

    def _pin(self, section: dict[str, Any], name: str, held: SectionBytes) -> None:
        """pin_memory "auto": on while what it pins, with what the sections before pinned, stays within half
        the rank's host memory."""
        if section.get("pin_memory") == AUTO:
            section["pin_memory"] = held.pinned(True) <= self.pin_left
        elif section.get("pin_memory") is True:
            self._beyond_host(
                held.pinned(True), f"zero_optimization.{name}.pin_memory=true pins", "pin_memory false"
            )
        self.pin_left -= held.pinned(section.get("pin_memory"))

    def _beyond_host(self, nbytes: int, what: str, fix: str) -> None:
        """A line when `nbytes` of pinned buffers exceed the rank's host memory; `fix` is what to set."""
        if nbytes > self.host.share:
            self._add(
                f"{what}: {_size(nbytes)} pinned, more than the {_size(self.host.share)} of host memory per "
                f'rank; set {fix} or "auto"'
            )

    def _add(self, line: str) -> None:
        self.problems.add(f"{self.source}: {line}")


def _section(zero: dict[str, Any], key: str) -> dict[str, Any]:
    value = zero.get(key)
    return value if isinstance(value, dict) else {}


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.0f} MiB"


def _fill(section: dict[str, Any], key: str, value: Any) -> Any:
    """The section's value for key, `value` written in where it says "auto"."""
    if section.get(key) == AUTO:
        section[key] = value
    return section.get(key, value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
