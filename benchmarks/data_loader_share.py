"""How much of a training step the data path takes: sampler + window reads + batch assembly.

    python benchmarks/data_loader_share.py [--data PREPARED_FOLDER_OR_TEXT] [--steps 40]

Times the real Trainer.train_step on gpt2-tiny (fp32, ZeRO-0, one process) and, side by side in the
same run, the data path alone over the same number of steps, and prints both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def main() -> None:
    from ds_trainer.checkpoint import Checkpointer, Progress
    from ds_trainer.config import load_run_config
    from ds_trainer.data import GlobalBatchSampler, SampleStream, build_datasets
    from ds_trainer.ds_config import load_ds_json, resolve
    from ds_trainer.engine import build_engine, init_distributed
    from ds_trainer.guard import GuardSettings, IncidentLog, LossGuard
    from ds_trainer.metrics import Metrics
    from ds_trainer.model import GPT
    from ds_trainer.preemption import StopRequest
    from ds_trainer.trainer import LoopSettings, Trainer
    from ds_trainer.watchdog import Watchdog

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args()

    run = load_run_config(
        None,
        [
            "--data.path",
            args.data,
            "--data.context_length",
            str(args.context),
            "--train.micro_batch_size",
            str(args.micro),
            "--train.max_steps",
            str(args.steps),
        ],
    )
    train, _, weights = build_datasets(run.data_sources(), run.context_length, run.stride, None, 50257)
    raw, source = load_ds_json(None)
    ds = resolve(raw, source, run, 1, sum(train.sizes()), "cpu")
    init_distributed()
    torch.manual_seed(0)
    engine = build_engine(GPT(run.gpt_config()), ds)

    def sampler() -> GlobalBatchSampler:
        return GlobalBatchSampler(SampleStream(train.sizes(), weights, seed=0), ds.micro_batch_size, 0, 1)

    settings = LoopSettings(args.steps, 1, 0, 1, 0, 0, "", 0, 1.0, 0)
    trainer = Trainer(
        engine,
        ds,
        train,
        None,
        sampler(),
        Progress(),
        Checkpointer(Path("."), 0, 1, {}, {}),
        Metrics([], console=False),
        settings,
        StopRequest(None, 600.0, 1),
        Watchdog(1800.0),
        LossGuard(GuardSettings(2.0, 100, 3, 0.5, 100), 1),
        IncidentLog(None),
    )
    trainer.train_step(ds.train_batch_size, want_grad_norm=False)  # warm-up: allocations, first-call costs

    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(ds.train_batch_size, want_grad_norm=False)
    step_s = (time.perf_counter() - t0) / args.steps

    s = sampler()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        for ids in s.next_step(ds.gradient_accumulation_steps):
            train.batch(ids)
    data_s = (time.perf_counter() - t0) / args.steps

    kind = "prepared shards (memory-mapped)" if Path(args.data, "train.json").is_file() else "text in memory"
    print(
        f"data: {args.data} ({kind}), {sum(train.sizes()):,} windows of {args.context}, micro batch {args.micro}"
    )
    print(f"train step (incl. data): {step_s * 1000:8.2f} ms")
    print(f"data path alone:         {data_s * 1000:8.3f} ms")
    print(f"data share of step time: {100 * data_s / step_s:8.3f} %  (goal < 2%)")


if __name__ == "__main__":
    main()
