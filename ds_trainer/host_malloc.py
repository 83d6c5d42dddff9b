"""What the host's allocator does with the memory a step frees: glibc's mallopt(3), set once at start-up.

PyTorch's CPU tensors come from glibc's malloc and go back to it when freed. glibc serves every block above
its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free, so a step that allocates and
frees the same large activations each time (the logits alone are batch × context × vocabulary floats) has the
kernel fault in and zero that memory again every step. On the 2-core CPU machine, the `small` shape of
benchmarks/throughput.py (6 × 384, context 256, batch 8, fp32) takes 460,000 page faults (1.8 GB) per step;
keeping the freed memory in glibc's heap removes them and makes the step about 18 % faster
(benchmarks/host_malloc.py), for more resident memory: the heap stays at the step's high-water mark and
keeps its fragments.

That trade is right only where the steps compute on the host and host memory is not the budget. On a GPU
the step's tensors live in PyTorch's CUDA allocator, and what the host frees is mostly a checkpoint's copy,
better given back. Under ZeRO offload the host holds the optimizer state and the parameters, and the
planner's host figures assume freed memory goes back. So `train.host_malloc` "auto" keeps freed memory on
a CPU accelerator with nothing offloaded, and leaves glibc alone otherwise.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

CHOICES = ("auto", "keep", "glibc")


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


def choose(requested: str, on_host: bool, offloaded: bool) -> MallocPolicy:
    """The policy for `train.host_malloc` when the steps compute `on_host` (the CPU accelerator) or not, on a
    layout that does (`offloaded`) or does not offload."""
    if requested == "keep" or (requested == "auto" and on_host and not offloaded):
        why = "train.host_malloc keep" if requested == "keep" else "steps on the CPU, nothing offloaded"
        return MallocPolicy("keep freed memory for the next step", KEEP, why)
    if requested == "glibc":
        why = "train.host_malloc glibc"
    else:
        why = "ZeRO offload: host memory is the budget" if offloaded else "steps on an accelerator"
    return MallocPolicy("glibc", (), why)


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc
