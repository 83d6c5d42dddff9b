"""How much of a training step the data path takes: sampler + window reads + batch assembly.

    python benchmarks/data_loader_share.py [--data PREPARED_FOLDER_OR_TEXT] [--steps 40]

Times the real data-parallel step (ds_trainer.step) on gpt2-tiny (fp32, ZeRO-0, one process) and, side by side in the
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
    from ds_trainer.collectives import Group
    from ds_trainer.config import GuardSection, load_run_config
    from ds_trainer.data import GlobalBatchSampler, SampleStream, build_datasets
    from ds_trainer.ds_config import load_ds_json, resolve
    from ds_trainer.engine import build_engine
    from ds_trainer.faults import Faults
    from ds_trainer.guard import LossGuard
    from ds_trainer.model import GPT
    from ds_trainer.process import init_distributed
    from ds_trainer.step import BatchSource, DataParallelStep

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

    guard = LossGuard(GuardSection())
    step = DataParallelStep(engine, ds, train, Group(1), guard, Faults([], 0, Path(".")))
    batches = BatchSource(sampler(), ds, run.context_length)
    step(batches.next(1), grad_norm=False)  # warm-up: allocations, first-call costs

    t0 = time.perf_counter()
    for k in range(args.steps):
        step(batches.next(k + 2), grad_norm=False)
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
