"""Goodput under failures: a run with a rank killed every N steps, kept alive by launch/resilient.py.

Runs the same 2-rank job twice, uninterrupted and with faults, and prints side by side: wall time,
steps executed, steps lost per failure, time from each kill to the next trained step, and the
effective training time (the uninterrupted run's time for the useful steps over the faulty run's
wall time).

TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/goodput.py [--steps 40 --every 9 --save 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "the-verdict.txt"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def launch(run: Path, ds: Path, steps: int, save: int, faults: str) -> float:
    from ds_trainer.process import free_port  # here, not at the top: it imports DeepSpeed

    pretrain = [
        str(REPO / "launch" / "pretrain.py"),
        "--ds_config", str(ds), "--model.preset", "gpt2-tiny", "--data.path", str(DATA),
        "--data.context_length", "64", "--train.micro_batch_size", "4", "--train.max_steps", str(steps),
        "--eval.interval", "0", "--log.interval", "1", "--checkpoint.dir", str(run),
        "--checkpoint.save_interval", str(save), "--train.watchdog_timeout", "120",
    ]  # fmt: skip
    cmd = [sys.executable, str(REPO / "launch" / "resilient.py"), "--backoff", "1", "--max_restarts", "20"]
    cmd += ["--num_gpus", "2", "--master_port", str(free_port()), *pretrain]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_TRAINER_FAULTS": faults}
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"run failed with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=9, help="a rank is killed after every N-th step")
    ap.add_argument("--save", type=int, default=5, help="checkpoint.save_interval")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="goodput_"))
    cfg = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    cfg["bf16"] = {"enabled": False}  # no native bf16 on CPU: emulation would dominate the step time
    ds = base / "zero1_fp32.json"
    ds.write_text(json.dumps(cfg))
    kills = list(range(args.every, args.steps, args.every))
    faults = ",".join(f"kill@{k}:{i % 2}" for i, k in enumerate(kills))

    clean_wall = launch(base / "clean", ds, args.steps, args.save, "")
    faulty_wall = launch(base / "faulty", ds, args.steps, args.save, faults)

    clean, faulty = metrics(base / "clean"), metrics(base / "faulty")
    step_ms = {m["step"]: m["perf/step_ms"] for m in clean if "perf/step_ms" in m}
    useful_s = sum(step_ms.values()) / 1000  # the steps the faulty run had to deliver, at clean speed
    executed = sum(1 for m in faulty if "train/loss" in m)
    trained = [m for m in faulty if "train/loss" in m]
    recoveries = []
    for k in kills:  # kill: the killed step's line; recovered: the next trained step after it
        killed = min(m["time"] for m in trained if m["step"] == k)
        recoveries.append(min(m["time"] for m in trained if m["time"] > killed) - killed)
    events = [json.loads(line) for line in (base / "faulty" / "restarts.jsonl").read_text().splitlines()]
    restarts = sum(1 for e in events if e["event"] == "restart")

    print(
        f"gpt2-tiny, 2 ranks, ZeRO-1 fp32, {args.steps} steps, save every {args.save}, kill every {args.every}"
    )
    print(f"faults: {faults}")
    print(f"{'':28}{'clean':>10}{'faulty':>10}")
    print(f"{'wall time (s)':28}{clean_wall:>10.1f}{faulty_wall:>10.1f}")
    print(f"{'steps executed':28}{args.steps:>10}{executed:>10}")
    print(f"{'failures / restarts':28}{0:>10}{f'{len(kills)} / {restarts}':>10}")
    print(f"{'useful step time (s)':28}{useful_s:>10.1f}{useful_s:>10.1f}")
    print(f"{'effective training time':28}{useful_s / clean_wall:>10.1%}{useful_s / faulty_wall:>10.1%}")
    print(f"lost steps per failure: {(executed - args.steps) / max(len(kills), 1):.1f}")
    print(f"kill -> next trained step (s): {', '.join(f'{r:.1f}' for r in recoveries)}")
    print(f"wall time per failure (s): {(faulty_wall - clean_wall) / max(len(kills), 1):.1f}")


if __name__ == "__main__":
    main()
