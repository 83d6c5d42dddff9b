"""The host allocator's policy: which one a layout gets, that "keep" really stops the page faults and that
"release" really gives freed memory back."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, ok, run_pretrain, tiny_args

from ds_trainer.host_malloc import KEEP, RELEASE, choose, tight
from ds_trainer.model import PRESETS
from ds_trainer.planning.shape import count_parameters

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


# A child process again: it frees a 16 MiB tensor (glibc then raises its mmap threshold to 16 MiB), allocates
# 64 tensors of 4 MiB, frees all but the last and prints how much more memory is resident than before them.
RESIDENT_PROBE = """
import os, sys, torch
from ds_trainer.host_malloc import choose
print(choose(sys.argv[1], on_host=True, offloaded=sys.argv[2] == "1").apply())
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
torch.ones(4 * 2**20).sum()
before = resident()
blocks = [torch.ones(2**20) for _ in range(64)]
del blocks[:-1]
print(resident() - before)
"""


def probe(policy: str, offloaded: bool, code: str = PROBE) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", code, policy, "1" if offloaded else "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    return out[0], int(out[-1])


def test_auto_keeps_freed_memory_for_steps_on_the_cpu_and_releases_it_under_offload():
    assert choose("auto", on_host=True, offloaded=False).settings == KEEP
    assert choose("auto", on_host=True, offloaded=True).settings == RELEASE
    assert choose("auto", on_host=False, offloaded=True).settings == RELEASE
    assert choose("auto", on_host=False, offloaded=False).settings == ()
    assert choose("keep", on_host=False, offloaded=True).settings == KEEP
    assert choose("release", on_host=True, offloaded=False).settings == RELEASE
    assert choose("glibc", on_host=True, offloaded=True).settings == ()


def test_auto_releases_on_a_cpu_host_too_tight_to_keep_freed_memory():
    # The CI-class machine, one rank: gpt2-medium's states (16 x 355M = 5.7 GB) are within a quarter of its
    # 23.54 GiB, gpt2-large's (16 x 774M = 12.4 GB, killed by the kernel with kept memory) are not.
    host = int(23.54 * 2**30)
    medium, large = (count_parameters(PRESETS[p]).total for p in ("gpt2-medium", "gpt2-large"))
    assert (tight(medium, host), tight(large, host)) == (False, True)
    assert tight(medium, host // 2)  # two ranks on that host
    policy = choose("auto", on_host=True, offloaded=False, host_tight=True)
    assert policy.settings == RELEASE
    assert "the model's training states above 25% of host memory" in policy.why
    assert choose("keep", on_host=True, offloaded=False, host_tight=True).settings == KEEP  # asked for


def test_a_cpu_run_on_a_tight_host_releases_freed_memory(tmp_path, verdict_path):
    """gpt2-tiny (3.3M parameters, 53 MB of states) told its host has 128 MiB: more than a quarter."""
    args = tiny_args(tmp_path / "run", verdict_path, 2, **{"train.host_memory_gb": 1 / 8})
    proc = run_pretrain(["--ds_config", str(REPO / "ds_configs" / "zero0.json"), *args])
    ok(proc)
    assert (
        "host malloc: give freed blocks above 128 KiB back to the kernel (steps on the CPU, the model's "
        "training states above 25% of host memory)"
    ) in proc.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's, on Linux")
def test_kept_memory_is_reused_without_page_faults():
    line, faults = probe("auto", offloaded=False)
    assert line == "host malloc: keep freed memory for the next step (steps on the CPU, nothing offloaded)"
    assert faults < 500, faults  # 5 x 16,384 pages when each block is mapped anew
    line, faults = probe("glibc", offloaded=False)
    assert line == "host malloc: glibc's defaults (train.host_malloc glibc)"
    assert faults > 5 * 16_000, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's, on Linux")
def test_released_memory_goes_back_to_the_kernel():
    line, held = probe("auto", offloaded=True, code=RESIDENT_PROBE)
    assert line == (
        "host malloc: give freed blocks above 128 KiB back to the kernel (ZeRO offload: host memory is the budget)"
    )
    assert held < 16 * 2**20, held  # the one 4 MiB tensor still alive
    line, held = probe("glibc", offloaded=True, code=RESIDENT_PROBE)
    assert held > 200 * 2**20, held  # glibc's heap keeps the 63 freed blocks below the one still alive
