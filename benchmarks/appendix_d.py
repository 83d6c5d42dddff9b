"""The from-scratch book's appendix-D run with ds_trainer, and our figures beside the book's.

    python benchmarks/appendix_d.py [--data ../shared/data/the-verdict.txt] [--run_dir runs/appendix_d_bench]

Runs `launch/pretrain.py --config ds_configs/runs/appendix_d.yaml --ds_config ds_configs/appendix_d.json`
(135 steps of GPT-2 124M on the-verdict, fp32 ZeRO-0: minutes on a CPU), then reads its metrics.jsonl and
prints the run's figures beside the ones the book publishes, checks every step's learning rate against the
book's formula written out here, and draws the book's two pictures (launch/plot.py) when matplotlib is there.
Exits 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The schedule of the book's run (ds_configs/runs/appendix_d.yaml says the same).
INITIAL_LR, PEAK_LR, MIN_LR, WARMUP, TOTAL = 1e-5, 1e-3, 1e-5, 27, 135

# The book's published log of this run (appendix D): the first evaluation, the training loss at the end, and
# the validation loss's minimum and last value.
BOOK = {"first_train": 10.934, "first_val": 10.939, "last_train": 0.035, "best_val": 6.2, "last_val": 6.94}


def books_lr(k: int) -> float:
    """The book's loop: linear warm-up from INITIAL_LR, then cosine from PEAK_LR at k = WARMUP to MIN_LR."""
    if k < WARMUP:
        return INITIAL_LR + k * (PEAK_LR - INITIAL_LR) / WARMUP
    progress = (k - WARMUP) / (TOTAL - WARMUP)
    return MIN_LR + (PEAK_LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def run(data: str, run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        *("--config", str(REPO / "ds_configs" / "runs" / "appendix_d.yaml")),
        *("--ds_config", str(REPO / "ds_configs" / "appendix_d.json")),
        *("--data.path", data, "--checkpoint.dir", str(run_dir)),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, timeout=3 * 3600)
    return time.perf_counter() - start


def figures(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m for m in records if "val/loss" in m}
    logs = {m["step"]: m for m in records if "train/lr" in m}
    best = min(evals, key=lambda s: evals[s]["val/loss"])
    last = max(evals)
    lr_error = max(abs(logs[s]["train/lr"] / books_lr(s - 1) - 1) for s in range(1, TOTAL + 1))
    below_one = min((s for s, m in evals.items() if m["eval/train_loss"] < 1.0), default=None)
    return {
        "first_train": evals[1]["eval/train_loss"],
        "first_val": evals[1]["val/loss"],
        "last_train": evals[last]["eval/train_loss"],
        "best_val": evals[best]["val/loss"],
        "best_val_step": best,
        "last_val": evals[last]["val/loss"],
        "train_below_1_at": below_one,
        "lr_max_rel_error": lr_error,
        "tok_s": sum(m["perf/tokens_per_sec"] for m in logs.values()) / len(logs),
        "evaluations": len(evals),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "the-verdict.txt"))
    parser.add_argument("--run_dir", default=str(REPO / "runs" / "appendix_d_bench"))
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    seconds = run(args.data, run_dir)
    got = figures(run_dir)
    goals = {
        "training loss (eval mode) at the end < 0.1": got["last_train"] < 0.1,
        "best validation loss <= 6.35": got["best_val"] <= 6.35,
        "last validation loss within 0.15 of 6.94": abs(got["last_val"] - BOOK["last_val"]) <= 0.15,
        "every step's lr = the book's formula within 1e-9": got["lr_max_rel_error"] <= 1e-9,
    }
    print(f"\n| appendix D, {TOTAL} steps | the book | ds_trainer |\n|---|---|---|")
    print(f"| first evaluation: train / val loss | {BOOK['first_train']} / {BOOK['first_val']} | "
          f"{got['first_train']:.3f} / {got['first_val']:.3f} |")  # fmt: skip
    print(f"| training loss at the end (eval mode) | {BOOK['last_train']} | {got['last_train']:.3f} |")
    print(f"| best validation loss (step) | about {BOOK['best_val']} (near step 55) | "
          f"{got['best_val']:.3f} (step {got['best_val_step']}) |")  # fmt: skip
    print(f"| validation loss at the end | {BOOK['last_val']} | {got['last_val']:.3f} |")
    print(f"| first evaluation with training loss < 1 | by step 60 | step {got['train_below_1_at']} |")
    print(f"| max relative lr error vs the formula | 0 | {got['lr_max_rel_error']:.1e} |")
    print(f"\nwall time {seconds:,.0f} s, {got['tok_s']:,.0f} tokens/s (mean of the logged steps), "
          f"{got['evaluations']} evaluations")  # fmt: skip
    try:
        from ds_trainer.plot import read_curves, write_png

        print(f"plot: {write_png(read_curves(run_dir), run_dir / 'training.png')}")
    except Exception as e:  # the figures above stand without the picture
        print(f"plot skipped: {e}")
    for goal, met in goals.items():
        print(f"{'met ' if met else 'MISSED'} {goal}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
