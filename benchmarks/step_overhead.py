"""What ds_trainer adds around DeepSpeed's forward, backward and step, as a share of each step's wall time.

One process, one rank, the real trainer (`ds_trainer.pretrain`): the engine's `forward`, `backward` and
`step` and every component the loop calls are wrapped in timers. A loop iteration runs from one watchdog
beat to the next; what is not inside the engine's three calls is the trainer's overhead: taking the batch
from the sampler and building its tensors, the loss mean and the guard's verdict, the learning-rate
bookkeeping, the logger (TensorBoard and JSONL at log steps), the watchdog and the stop agreement. The
first steps (allocation, kernel choice) and the last (the final save) are left out.

TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/step_overhead.py [--shapes tiny,gpt2]
    [--dtypes fp32,bf16] [--ds_config ds_configs/zero0.json]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
SKIP = 3  # first iterations left out

# name: (run-config overrides, steps, goal: largest overhead share)
SHAPES = {
    # The built-in default run's shape (ds_configs/runs/tiny.yaml): gpt2-tiny, context 128, batch 4.
    "tiny": (["--model.preset", "gpt2-tiny", "--train.micro_batch_size", "4"], 60, 0.02),
    # GPT-2 124M at the books' context of 256, batch 2.
    "gpt2": (
        ["--model.preset", "gpt2", "--data.context_length", "256", "--train.micro_batch_size", "2"],
        16,
        0.005,
    ),
}


class Timers:
    """Seconds spent in each wrapped call, per loop iteration."""

    def __init__(self) -> None:
        self.iterations: list[dict[str, float]] = []

    def wrap(self, obj: object, method: str, name: str) -> None:
        inner = getattr(obj, method)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.iterations:
                    self.iterations[-1][name] += time.perf_counter() - start

        setattr(obj, method, timed)

    def beat(self) -> None:
        """A new loop iteration starts (the watchdog's beat is the loop's first call)."""
        now = time.perf_counter()
        if self.iterations:
            self.iterations[-1]["wall"] = now - self.iterations[-1]["wall"]
        self.iterations.append(collections.defaultdict(float, wall=now))


def measure(shape: str, ds_json: str, tmp: Path) -> list[dict[str, float]]:
    import ds_trainer.pretrain as pretrain_module
    from ds_trainer.config import load_run_config

    overrides, steps, _ = SHAPES[shape]
    run = load_run_config(
        None,
        [*overrides, "--data.path", str(DATA / "tinyshakespeare.txt"), "--train.max_steps", str(steps),
         "--eval.interval", "0", "--checkpoint.dir", str(tmp / shape), "--checkpoint.save_interval", "0"],
    )  # fmt: skip
    timers = Timers()
    build_engine, build_trainer = pretrain_module.build_engine, pretrain_module.build_trainer

    def timed_engine(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        for method in ("forward", "backward", "step"):
            timers.wrap(engine, method, f"engine.{method}")
        return engine

    def timed_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        beat = trainer.watchdog.beat
        trainer.watchdog.beat = lambda: (timers.beat(), beat())
        parts = {"batches": ["next"], "log": ["after_step"], "recovery": ["after_step"], "faults": ["after_step"],
                 "stop": ["after_step", "check"], "evaluator": ["maybe_run"], "checkpointer": ["maybe_save"]}  # fmt: skip
        for part, methods in parts.items():
            for method in methods:
                timers.wrap(getattr(trainer, part), method, f"{part}.{method}")
        timers.wrap(trainer, "step", "step")
        return trainer

    pretrain_module.build_engine, pretrain_module.build_trainer = timed_engine, timed_trainer
    try:
        assert pretrain_module.pretrain(run, ds_json) == 0
    finally:
        pretrain_module.build_engine, pretrain_module.build_trainer = build_engine, build_trainer
    # The last iteration never saw a next beat (and holds the final save): leave it out with the first.
    return [dict(it) for it in timers.iterations[SKIP:-1]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="tiny,gpt2")
    parser.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero0.json"))
    parser.add_argument("--dtypes", default="fp32,bf16", help="the JSON's precision is set to each in turn")
    parser.add_argument("--one", nargs=3, metavar=("SHAPE", "DS_JSON", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # one run, in its own process: DeepSpeed's process groups do not outlive a run cleanly
        shape, ds_json, folder = args.one
        print("ITERATIONS " + json.dumps(measure(shape, ds_json, Path(folder))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
        for shape, dtype in [(s, d) for s in args.shapes.split(",") for d in args.dtypes.split(",")]:
            ds = json.loads(Path(args.ds_config).read_text())
            ds["bf16"] = {"enabled": dtype == "bf16"}
            ds_json = Path(tmp) / f"{dtype}.json"
            ds_json.write_text(json.dumps(ds))
            cmd = [sys.executable, __file__, "--one", shape, str(ds_json), str(Path(tmp) / dtype)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            (line,) = [x for x in out.splitlines() if x.startswith("ITERATIONS ")]
            rows.append((f"{shape} {dtype}", SHAPES[shape][2], json.loads(line.split(" ", 1)[1])))
    print("| shape | steps timed | median step | trainer's share | goal | within |")
    print("|---|---|---|---|---|---|")
    for name, goal, iterations in rows:
        wall, engine = sum(it["wall"] for it in iterations), engine_seconds(iterations)
        share, median_ms = (wall - engine) / wall, statistics.median(it["wall"] for it in iterations) * 1000
        print(f"| {name} | {len(iterations)} | {median_ms:,.1f} ms | {share:.2%} | <= {goal:.1%} | "
              f"{'yes' if share <= goal else 'NO'} |")  # fmt: skip
    for name, _, iterations in rows:
        n, wall, engine = len(iterations), sum(it["wall"] for it in iterations), engine_seconds(iterations)
        step = sum(it.get("step", 0.0) for it in iterations)
        print(f"\n{name}: per step, {(wall - engine) / n * 1000:.2f} ms outside DeepSpeed's forward/backward/step, "
              f"of which {(step - engine) / n * 1000:.2f} ms inside our step (batch tensors, loss mean, guard, lr)")  # fmt: skip
        parts = {k for it in iterations for k in it if "." in k and not k.startswith("engine.")}
        for part in sorted(parts, key=lambda k: -sum(it.get(k, 0.0) for it in iterations)):
            print(f"  {part:24s} {sum(it.get(part, 0.0) for it in iterations) / n * 1000:8.3f} ms")


def engine_seconds(iterations: list[dict[str, float]]) -> float:
    return sum(it.get(f"engine.{m}", 0.0) for it in iterations for m in ("forward", "backward", "step"))


if __name__ == "__main__":
    main()
