"""For each offload layout, the largest GPT-2 preset that trains on this machine: peak resident memory,
s/step and tokens/s, beside the planner's predicted peak (`launch/plan.py --host_memory ... --cpu_ranks`).

Each case is one process of the real trainer (launch/pretrain.py, one rank, micro batch 1, context 128,
the shipped JSON unmodified but for its NVMe folder) training --steps steps on the-verdict.txt and saving
at the end. The peak is the process's maximum resident set (getrusage of a wrapper process that runs only
it). Presets are tried from the largest the planner says fits, downwards, until one trains.

TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/offload_scale.py [--steps 4]
    [--layouts none,cpu,nvme] [--nvme_path /tmp/ds_trainer_nvme]
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "the-verdict.txt"
PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
LAYOUTS = {"none": "zero3", "cpu": "zero3_offload_cpu", "nvme": "zero3_offload_nvme"}
CONTEXT = 128


def predicted_peak(preset: str, layout: str, nvme_path: str) -> tuple[int, bool]:
    """The planner's peak resident bytes for this machine, and whether it says the layout fits."""
    from ds_trainer.offload import Host
    from ds_trainer.planning import PlanRequest
    from ds_trainer.planning.planner import host_plan

    request = PlanRequest(preset, zero=3, micro_batch=1, context=CONTEXT, dtype="bf16")
    for need in host_plan(request, Host.detect(), nvme_path, device_on_host=True):
        if need.base_file == LAYOUTS[layout]:
            return need.resident, need.fits
    raise KeyError(layout)


def one_run(preset: str, layout: str, steps: int, nvme_path: str, tmp: Path) -> dict:
    """Train one case in a child process; its peak RSS, seconds per step (first step left out), exit code."""
    raw = json.loads((REPO / "ds_configs" / f"{LAYOUTS[layout]}.json").read_text())
    for section in raw["zero_optimization"].values():
        if isinstance(section, dict) and "nvme_path" in section:
            section["nvme_path"] = nvme_path
    (tmp / "ds.json").write_text(json.dumps(raw))
    run = tmp / f"run_{preset}_{layout}"
    cmd = [
        sys.executable, str(REPO / "launch" / "pretrain.py"), "--ds_config", str(tmp / "ds.json"),
        "--model.preset", preset, "--data.path", str(DATA), "--data.context_length", str(CONTEXT),
        "--train.micro_batch_size", "1", "--train.max_steps", str(steps), "--eval.interval", "0",
        "--log.interval", "1", "--checkpoint.dir", str(run), "--checkpoint.save_interval", "0",
    ]  # fmt: skip
    # One pipe for both streams: DeepSpeed warns on stderr at every step, and a second pipe left unread
    # would fill and stall the run.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    at_steps = []  # (seconds, bytes read from disk, bytes written) as each step's console line appears
    last = ""
    for line in proc.stdout:
        if line.startswith("step "):
            at_steps.append((time.perf_counter(), *disk_bytes(proc.pid)))
        if line.strip():
            last = line.strip()
    proc.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # this wrapper ran one child
    metrics = run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    step_s = [r["perf/step_ms"] / 1000 for r in records if "perf/step_ms" in r and r["step"] > 1]
    losses = [r["train/step_loss"] for r in records if "train/step_loss" in r]
    shutil.rmtree(run, ignore_errors=True)  # a gpt2-xl checkpoint is 18 GB
    return {
        "rc": proc.returncode,
        "peak": peak,
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
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
    if args.one:  # one case in this process's only child, so that RUSAGE_CHILDREN is that child's
        with tempfile.TemporaryDirectory(prefix="offload_scale_") as tmp:
            print(json.dumps(one_run(*args.one, args.steps, args.nvme_path, Path(tmp))))
        return
    from ds_trainer.offload import Host

    host = Host.detect()
    print(
        f"host memory {host.memory_bytes / 2**30:.2f} GiB; {args.steps} steps, micro batch 1, context {CONTEXT}, bf16"
    )
    if "nvme" in args.layouts:
        aio = json.loads((REPO / "ds_configs" / f"{LAYOUTS['nvme']}.json").read_text())["aio"]
        raw = raw_disk_speed(args.nvme_path, aio)
        print(
            f"disk at {args.nvme_path} by ds_io with the JSON's aio settings: read {raw[1]:.2f}, write {raw[0]:.2f} GB/s"
        )
    print("| layout | largest preset that trains | peak resident (GiB) | planner's peak (GiB) | error | s/step | "
          "tokens/s | disk read / write during the steps (GB/s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for layout in args.layouts.split(","):
        fitting = [p for p in PRESETS if predicted_peak(p, layout, args.nvme_path)[1]]
        tried = []
        for preset in reversed(fitting):
            cmd = [sys.executable, __file__, "--one", preset, layout, "--steps", str(args.steps),
                   "--nvme_path", args.nvme_path]  # fmt: skip
            out = json.loads(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout)
            finite = len(out["losses"]) >= args.steps and all(x == x for x in out["losses"])
            if out["rc"] == 0 and finite:
                predicted = predicted_peak(preset, layout, args.nvme_path)[0]
                error = predicted / out["peak"] - 1
                io = f"{out['io'][0]:.2f} / {out['io'][1]:.2f}" if out["io"] else "-"
                print(f"| {LAYOUTS[layout]} | {preset} | {out['peak'] / 2**30:.2f} | {predicted / 2**30:.2f} | "
                      f"{error:+.1%} | {out['step_s']:.1f} | {CONTEXT / out['step_s']:.1f} | {io} |", flush=True)  # fmt: skip
                break
            tried.append(f"{preset} (exit {out['rc']}: {out['error'][:120]})")
        else:
            print(f"| {LAYOUTS[layout]} | none | | | | | | |")
        if tried:
            print(f"  did not train: {'; '.join(tried)}")


if __name__ == "__main__":
    main()
