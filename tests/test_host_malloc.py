"""The host allocator's policy: which one a layout gets, and that "keep" really stops the page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ds_trainer.host_malloc import KEEP, choose

# A child process: mallopt changes the whole process, so each policy gets a fresh one. It allocates and frees
# a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) twenty times and prints the minor page
# faults the last five took (the heap's layout settles within the first few, which may still fault).
PROBE = """
import resource, sys, torch
from ds_trainer.host_malloc import choose
print(choose(sys.argv[1], on_host=True, offloaded=sys.argv[2] == "1").apply())
for i in range(20):
    if i == 15:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(policy: str, offloaded: bool) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, policy, "1" if offloaded else "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    return out[0], int(out[-1])


def test_auto_keeps_freed_memory_only_for_steps_on_the_cpu_without_offload():
    assert choose("auto", on_host=True, offloaded=False).settings == KEEP
    assert choose("auto", on_host=True, offloaded=True).settings == ()
    assert choose("auto", on_host=False, offloaded=False).settings == ()
    assert choose("keep", on_host=False, offloaded=True).settings == KEEP
    assert choose("glibc", on_host=True, offloaded=False).settings == ()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's, on Linux")
def test_kept_memory_is_reused_without_page_faults():
    line, faults = probe("auto", offloaded=False)
    assert line == "host malloc: keep freed memory for the next step (steps on the CPU, nothing offloaded)"
    assert faults < 500, faults  # 5 x 16,384 pages when each block is mapped anew
    line, faults = probe("auto", offloaded=True)
    assert line == "host malloc: glibc's defaults (ZeRO offload: host memory is the budget)"
    assert faults > 5 * 16_000, faults
