"""For each offload layout, the largest GPT-2 preset that trains on this machine: peak resident memory,
s/step and tokens/s, beside the planner's predicted peak (`launch/plan.py --host_memory ... --cpu_ranks`).

Each case is one process of the real trainer (launch/pretrain.py, one rank, micro batch 1, context 128 or
--context, the shipped JSON unmodified but for its NVMe folder, and with --dtype fp32 its bf16 section
off) training --steps steps on the-verdict.txt and saving at the end. The peak is the process's largest memory: its
maximum resident set (getrusage of a wrapper process that runs only it), or, where swap is on and the
kernel moved some of it out, its resident plus swapped bytes sampled every 50 ms, whichever is larger; the
peak before the first step (building the engine) is shown beside it. Presets are tried from the largest
the planner says fits, downwards, until one trains; --presets names presets to measure each (one the host
cannot hold can then be measured on a machine with swap: its memory is what it would need resident).

TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/offload_scale.py [--steps 4]
    [--layouts none,cpu,nvme] [--nvme_path /tmp/ds_trainer_nvme] [--dtype bf16|fp32] [--presets gpt2-xl]
    [--context 128]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "the-verdict.txt"
PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
LAYOUTS = {"none": "zero3", "cpu": "zero3_offload_cpu", "nvme": "zero3_offload_nvme"}
CONTEXT = 128
"""Tokens per sequence by default; a shorter --context measures bf16 on a CPU whose bf16 matmuls are slow
(activations are a small part of these peaks: docs/planning.md)."""


def predicted_peak(preset: str, layout: str, args: argparse.Namespace) -> tuple[int, bool]:
    """The planner's peak resident bytes for this machine, and whether it says the layout fits."""
    from ds_trainer.offload import Host
    from ds_trainer.planning import PlanRequest
    from ds_trainer.planning.planner import host_plan

    request = PlanRequest(preset, zero=3, micro_batch=1, context=args.context, dtype=args.dtype)
    for need in host_plan(request, Host.detect(), args.nvme_path, device_on_host=True):
        if need.base_file == LAYOUTS[layout]:
            return need.resident, need.fits
    raise KeyError(layout)


class MemorySampler:
    """A process's resident plus swapped bytes (/proc/PID/status) every 50 ms on a thread: the largest
    before `mark()` (building the engine) and overall."""

    def __init__(self, pid: int) -> None:
        self.pid, self.before_mark, self.peak, self.marked = pid, 0, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def mark(self) -> None:
        self.marked = True

    def _run(self) -> None:
        while (now := resident_and_swapped(self.pid)) is not None:
            self.peak = max(self.peak, now)
            if not self.marked:
                self.before_mark = self.peak
            time.sleep(0.05)


def resident_and_swapped(pid: int) -> int | None:
    """VmRSS + VmSwap of a process in bytes; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = dict(re.findall(r"^(VmRSS|VmSwap):\s+(\d+) kB", text, re.M))
    return (int(kib.get("VmRSS", 0)) + int(kib.get("VmSwap", 0))) * 1024 if kib else None


def one_run(preset: str, layout: str, malloc: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Train one case in a child process; its peak memory (overall and while building the engine),
    seconds per step (first step left out), exit code."""
    raw = json.loads((REPO / "ds_configs" / f"{LAYOUTS[layout]}.json").read_text())
    if args.dtype == "fp32":
        raw["bf16"]["enabled"] = False
    for section in raw["zero_optimization"].values():
        if isinstance(section, dict) and "nvme_path" in section:
            section["nvme_path"] = args.nvme_path
    (tmp / "ds.json").write_text(json.dumps(raw))
    run = tmp / f"run_{preset}_{layout}"
    cmd = [
        sys.executable, str(REPO / "launch" / "pretrain.py"), "--ds_config", str(tmp / "ds.json"),
        "--model.preset", preset, "--data.path", str(DATA), "--data.context_length", str(args.context),
        "--train.micro_batch_size", "1", "--train.max_steps", str(args.steps), "--eval.interval", "0",
        "--log.interval", "1", "--checkpoint.dir", str(run), "--checkpoint.save_interval", "0",
        "--train.host_malloc", malloc,
    ]  # fmt: skip
    # One pipe for both streams: DeepSpeed warns on stderr at every step, and a second pipe left unread
    # would fill and stall the run.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(proc.pid)
    at_steps = []  # (seconds, bytes read from disk, bytes written) as each step's console line appears
    last = ""
    for line in proc.stdout:
        if line.startswith("step "):
            sampler.mark()
            at_steps.append((time.perf_counter(), *disk_bytes(proc.pid)))
        if line.strip():
            last = line.strip()
    proc.wait()
    sampler.thread.join()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # this wrapper ran one child
    metrics = run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    step_s = [r["perf/step_ms"] / 1000 for r in records if "perf/step_ms" in r and r["step"] > 1]
    losses = [r["train/step_loss"] for r in records if "train/step_loss" in r]
    shutil.rmtree(run, ignore_errors=True)  # a gpt2-xl checkpoint is 18 GB
    return {
        "rc": proc.returncode,
        "peak": max(peak, sampler.peak),
        "build_peak": sampler.before_mark,
        "step_s": statistics.median(step_s) if step_s else None,
        "losses": losses,
        "error": last if proc.returncode else "",
        "io": disk_rates(at_steps),
    }


def disk_bytes(pid: int) -> tuple[int, int]:
    """Bytes the process has read from and written to storage (/proc/PID/io), or zeros once it is gone."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except OSError:
        return 0, 0
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def disk_rates(at_steps: list[tuple[float, int, int]]) -> tuple[float, float] | None:
    """Read and write GB/s between the first step's line and the last one's: the steps after the first."""
    if len(at_steps) < 2:
        return None
    (t0, r0, w0), (t1, r1, w1) = at_steps[0], at_steps[-1]
    return (r1 - r0) / (t1 - t0) / 1e9, (w1 - w0) / (t1 - t0) / 1e9


def raw_disk_speed(folder: str, aio: dict) -> tuple[float, float]:
    """The disk's read and write GB/s at `folder` by DeepSpeed's own ds_io, with the JSON's aio settings."""
    speeds = []
    for read in (False, True):
        cmd = ["ds_io", "--folder", folder, "--io_size", "1G", "--loops", "3", "--block_size",
               str(aio["block_size"]), "--queue_depth", str(aio["queue_depth"]),
               "--io_parallel", str(aio.get("intra_op_parallelism", 1)), *(["--read"] if read else [])]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        speeds.append(float(re.findall(r"([0-9.]+) GB/sec", out)[-1]))
    return speeds[0], speeds[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layouts", default="none,cpu,nvme")
    parser.add_argument("--nvme_path", default="/tmp/ds_trainer_nvme")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--context", type=int, default=CONTEXT, help="tokens per sequence (default 128)")
    parser.add_argument(
        "--presets", help="comma-separated presets, each measured (default: the largest that fits and trains)"
    )
    parser.add_argument(
        "--host_malloc",
        default="auto",
        help="comma-separated train.host_malloc policies, each run per case, side by side (e.g. auto,glibc)",
    )
    parser.add_argument("--one", nargs=3, metavar=("PRESET", "LAYOUT", "MALLOC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from ds_trainer.model import PRESETS as KNOWN

    unknown = [p for p in (args.presets or "").split(",") if p and p not in KNOWN]
    if unknown:
        parser.error(f"--presets: unknown {', '.join(unknown)}; use some of {', '.join(KNOWN)}")
    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
    if args.one:  # one case in this process's only child, so that RUSAGE_CHILDREN is that child's
        with tempfile.TemporaryDirectory(prefix="offload_scale_") as tmp:
            preset, layout, malloc = args.one
            print(json.dumps(one_run(preset, layout, malloc, args, Path(tmp))))
        return
    from ds_trainer.offload import Host

    host = Host.detect()
    swap = swap_bytes()
    print(
        f"host memory {host.memory_bytes / 2**30:.2f} GiB, swap {swap / 2**30:.2f} GiB; {args.steps} steps, "
        f"micro batch 1, context {args.context}, {args.dtype}"
    )
    if "nvme" in args.layouts:
        aio = json.loads((REPO / "ds_configs" / f"{LAYOUTS['nvme']}.json").read_text())["aio"]
        raw = raw_disk_speed(args.nvme_path, aio)
        print(
            f"disk at {args.nvme_path} by ds_io with the JSON's aio settings: read {raw[1]:.2f}, write {raw[0]:.2f} GB/s"
        )
    print("| layout | preset | host_malloc | peak memory (GiB) | of it building the engine | planner's peak (GiB) | "
          "error | s/step | tokens/s | disk read / write during the steps (GB/s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    policies = args.host_malloc.split(",")
    for layout in args.layouts.split(","):
        named = args.presets.split(",") if args.presets else []
        predicted = {p: predicted_peak(p, layout, args) for p in named or PRESETS}
        chosen = named or [p for p in reversed(PRESETS) if predicted[p][1]]
        tried, trained = [], set()
        for preset in chosen:
            for malloc in policies:
                out = run_case(preset, layout, malloc, args)
                finite = len(out["losses"]) >= args.steps and all(x == x for x in out["losses"])
                if out["rc"] != 0 or not finite:
                    tried.append(f"{preset} with {malloc} (exit {out['rc']}: {out['error'][:120]})")
                    continue
                trained.add(preset)
                error = predicted[preset][0] / out["peak"] - 1
                io = f"{out['io'][0]:.2f} / {out['io'][1]:.2f}" if out["io"] else "-"
                print(f"| {LAYOUTS[layout]} | {preset} | {malloc} | {out['peak'] / 2**30:.2f} | "
                      f"{out['build_peak'] / 2**30:.2f} | {predicted[preset][0] / 2**30:.2f} | {error:+.1%} | "
                      f"{out['step_s']:.1f} | {args.context / out['step_s']:.1f} | {io} |", flush=True)  # fmt: skip
            if trained and not args.presets:  # the largest that trains; named presets are each measured
                break
        if not trained:
            print(f"| {LAYOUTS[layout]} | none | | | | | | | | |")
        if tried:
            print(f"  did not train: {'; '.join(tried)}")


def run_case(preset: str, layout: str, malloc: str, args: argparse.Namespace) -> dict:
    """One case in a fresh wrapper process (see --one)."""
    cmd = [sys.executable, __file__, "--one", preset, layout, malloc, "--steps", str(args.steps),
           "--nvme_path", args.nvme_path, "--dtype", args.dtype, "--context", str(args.context)]  # fmt: skip
    return json.loads(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout)


def swap_bytes() -> int:
    """Swap space the kernel has (/proc/meminfo SwapTotal)."""
    kib = re.search(r"^SwapTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(kib.group(1)) * 1024 if kib else 0


if __name__ == "__main__":
    main()
