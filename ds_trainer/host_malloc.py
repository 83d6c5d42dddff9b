"""What the host's allocator does with the memory a step frees: glibc's mallopt(3), set once at start-up.

PyTorch's CPU tensors come from glibc's malloc and go back to it when freed. glibc starts by serving every
block above 128 KiB with a fresh mapping, unmapped on free; each time such a block is freed it raises that
threshold to the block's size (up to 32 MiB), so from then on blocks below it come from the heap, and the
heap gives back only its top. Two things follow, each wrong for one kind of run:

- A step that allocates and frees the same large activations each time (the logits alone are batch ×
  context × vocabulary floats) has the kernel fault in and zero the blocks above the threshold again every
  step. On the 2-core CPU machine, the `small` shape of benchmarks/throughput.py (6 × 384, context 256,
  batch 8, fp32) takes 460,000 page faults (1.8 GB) per step; keeping freed memory in glibc's heap removes
  them and makes the step about 18 % faster (benchmarks/host_malloc.py), for more resident memory.
- Under ZeRO offload the host holds the optimizer state and the parameters, and host memory is the budget.
  The blocks below the raised threshold (a layer's gathered weights and gradients, DeepSpeed's staging
  copies) stay in the heap between steps, fragmented. With every block above 128 KiB mapped and unmapped
  instead, one fp32 rank peaked at 9.3 GiB instead of 11.1 (gpt2-medium, CPU offload) and at 13.8 GiB
  instead of 17.6 (gpt2-xl, NVMe offload), with the same losses, at 1.1-1.5x the seconds per step
  (benchmarks/offload_scale.py --host_malloc auto,glibc; README, "Offload"). The planner's host figures
  (launch/plan.py --host_memory) are what the run holds, so they assume the latter.

So `train.host_malloc` "auto" keeps freed memory on a CPU accelerator with nothing offloaded and room to
spare (KEEP_SHARE), releases it under offload or where the host is tight, and leaves glibc alone otherwise
(a GPU's steps allocate in CUDA's allocator).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

CHOICES = ("auto", "keep", "release", "glibc")


@dataclass(frozen=True)
class MallocPolicy:
    """A named set of mallopt settings and the reason it was chosen, for the start-up line."""

    name: str
    settings: tuple[tuple[int, int], ...]
    why: str

    def apply(self) -> str:
        """Set the policy in this process (a forked child inherits it, an exec'd one starts at glibc's
        defaults); returns the line that says what was done."""
        if not self.settings:
            return f"host malloc: glibc's defaults ({self.why})"
        libc = _glibc()
        if libc is None:
            return f"host malloc: left as it is, the C library is not glibc (asked: {self.name}, {self.why})"
        for param, value in self.settings:
            if libc.mallopt(param, value) != 1:
                return (
                    f"host malloc: glibc refused mallopt({param}, {value}), so {self.name} is not fully set"
                )
        return f"host malloc: {self.name} ({self.why})"


# Serve no block by mmap and trim the heap's top only beyond 2 GiB: freed blocks stay for reuse.
KEEP = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))  # mallopt takes a C int

# glibc's starting thresholds, set explicitly: that stops glibc raising them (mallopt(3)), so every block
# above 128 KiB is its own mapping, unmapped when freed, and the heap's top is trimmed beyond 128 KiB.
RELEASE = ((M_MMAP_THRESHOLD, 128 * 1024), (M_TRIM_THRESHOLD, 128 * 1024))


STATE_BYTES = 16
"""Bytes of training state per parameter: weights, gradients and Adam's two moments (fp32 throughout, or
bf16 weights and gradients beside fp32 master weights and moments)."""
KEEP_SHARE = 1 / 4
"""Keeping freed memory raises a CPU run's peak up to 1.4x (benchmarks/host_malloc.py), so "auto" keeps it
only while the model's training states take at most this share of a rank's host memory. gpt2-large
(12.4 GB of states) under ZeRO-3 on a 23.5 GiB host was killed by the kernel with it, and trained within
the planner's figure without (README, "Offload")."""


def tight(parameters: int, host_share: int) -> bool:
    """Whether a rank's host memory (`host_share` bytes) is too tight to keep what a step frees, for a model
    of `parameters`. Counted unpartitioned: the ranks of a CPU run share the host whatever ZeRO splits."""
    return STATE_BYTES * parameters > host_share * KEEP_SHARE


def choose(requested: str, on_host: bool, offloaded: bool, host_tight: bool = False) -> MallocPolicy:
    """The policy for `train.host_malloc` when the steps compute `on_host` (the CPU accelerator) or not, on a
    layout that does (`offloaded`) or does not offload, with host memory tight (`host_tight`, see `tight()`) or not."""
    if requested == "keep" or (requested == "auto" and on_host and not offloaded and not host_tight):
        why = "train.host_malloc keep" if requested == "keep" else "steps on the CPU, nothing offloaded"
        return MallocPolicy("keep freed memory for the next step", KEEP, why)
    if requested == "release" or (requested == "auto" and (offloaded or on_host)):
        if requested == "release":
            why = "train.host_malloc release"
        elif offloaded:
            why = "ZeRO offload: host memory is the budget"
        else:
            why = f"steps on the CPU, the model's training states above {KEEP_SHARE:.0%} of host memory"
        return MallocPolicy("give freed blocks above 128 KiB back to the kernel", RELEASE, why)
    why = "train.host_malloc glibc" if requested == "glibc" else "steps on an accelerator"
    return MallocPolicy("glibc", (), why)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc
