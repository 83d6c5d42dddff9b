"""Wall time of the same search with `--parallel 1` and `--parallel 2`, side by side in one run.

The same trials (the tiny grid, 4 gpt2-tiny runs) run as one search at a time, then as two at once on
this machine (each trial its share of the cores), each in a fresh study folder; prints both wall times,
the ratio, and the trials' validation losses (the same study either way, so the same values up to
floating-point order: the thread counts differ).

TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/search_parallel.py [--steps 30 --repeats 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "the-verdict.txt"
SPACE = REPO / "ds_configs" / "search" / "tiny_grid.yaml"


def search(study: Path, parallel: int, steps: int) -> tuple[float, dict[str, float]]:
    cmd = [
        sys.executable, str(REPO / "launch" / "search.py"), "--space", str(SPACE), "--study", str(study),
        "--parallel", str(parallel), "--model.preset", "gpt2-tiny", "--data.path", str(DATA),
        "--data.context_length", "64", "--train.micro_batch_size", "4", "--train.max_steps", str(steps),
        "--eval.interval", str(max(1, steps // 3)), "--eval.iters", "2", "--checkpoint.save_interval", "0",
        "--log.interval", "10",
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - started
    with (study / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    return wall, {f"{r['train.peak_lr']}/{r['train.warmup_steps']}": float(r["val_loss"]) for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    walls: dict[int, list[float]] = {1: [], 2: []}
    losses: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="search_bench_") as tmp:
        for r in range(args.repeats):
            for parallel in (1, 2):  # alternating, so a drift in the machine's speed hits both alike
                wall, losses[parallel] = search(Path(tmp) / f"study_{parallel}_{r}", parallel, args.steps)
                walls[parallel].append(wall)
                print(f"repeat {r + 1}: --parallel {parallel}: {wall:.1f} s", flush=True)
    print(f"\n4 trials of gpt2-tiny, {args.steps} steps each, on {os.cpu_count()} cores")
    print("| --parallel | wall time (median of repeats) | speed-up |\n|---|---|---|")
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    print(f"| 1 | {one:.1f} s | 1.00x |\n| 2 | {two:.1f} s | {one / two:.2f}x |")
    print("\nval loss per trial (peak_lr/warmup): parallel 1 vs 2")
    for key in sorted(losses[1]):
        print(f"  {key}: {losses[1][key]:.4f} vs {losses[2][key]:.4f}")


if __name__ == "__main__":
    main()
