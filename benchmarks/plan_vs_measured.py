"""Planner vs DeepSpeed's estimator vs bytes a live engine holds: model states in fp32 on the CPU.

    python benchmarks/plan_vs_measured.py [--models gpt2-tiny,gpt2] [--stages 0,2,3] [--context 64] [--dtype fp32]

For each model and ZeRO stage (world size 1, fp32, AdamW, the built-in DeepSpeed config with the stage
changed), builds the real engine in this process, trains two steps and measures, at the second optimizer
update (at the optimizer's flatten and step calls), the bytes held by the parameters, the gradients
(with the update's fp32 copies) and the optimizer states (which buffers count: MeasuredStates in benchmarks/plan_measure.py). Prints, side by side: the ZeRO paper's figure, the planner's, DeepSpeed's
estimator (none exists for ZeRO-0; at ZeRO-2 it assumes 16-bit weights, 2 + 18/N bytes per parameter),
the measured bytes, every live tensor's bytes over the pre-engine baseline, and the ratios. meas/plan
divides by what the planner says exists at the update (held states + update copies): ZeRO-3's gathered
module, part of the planner's peak, lives only in forward and backward, where nothing is measured.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

MIB = 2**20


def main() -> None:
    from plan_measure import live_tensor_bytes, measure_model_states, release_engine

    from ds_trainer.config import load_run_config
    from ds_trainer.ds_config import load_ds_json, resolve
    from ds_trainer.engine import build_engine, build_model
    from ds_trainer.planning import (
        Layout,
        count_parameters,
        deepspeed_estimate,
        model_states,
        zero_paper_states,
    )
    from ds_trainer.process import init_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2-tiny,gpt2")
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument(
        "--dtype", default="fp32", help="fp32 (default) or bf16 (emulated on CPUs without it: slow)"
    )
    args = ap.parse_args()

    init_distributed()
    rows = []
    for preset in args.models.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            run = load_run_config(
                None, ["--model.preset", preset, "--train.micro_batch_size", "1", "--train.max_steps", "4"]
            )
            raw, source = load_ds_json(None)
            raw["zero_optimization"] = {"stage": stage}
            if args.dtype == "bf16":
                raw["bf16"] = {"enabled": True}
            ds = resolve(raw, source, run, 1, 1000, "cpu")
            cfg = run.gpt_config()
            counted = count_parameters(cfg)
            layout = Layout(stage)
            baseline = live_tensor_bytes()
            t0 = time.perf_counter()
            torch.manual_seed(0)
            # As a run builds it: ZeRO-3 constructs the model inside zero.Init.
            engine = build_engine(build_model(cfg, ds), ds)
            measured = measure_model_states(engine, torch.randint(0, cfg.vocab_size, (1, args.context)))
            seconds = time.perf_counter() - t0
            release_engine(engine)
            del engine
            planned = model_states(counted, layout, args.dtype)
            paper = zero_paper_states(counted.total, layout, args.dtype)
            estimate = deepspeed_estimate(counted, layout)
            rows.append((preset, stage, counted.total, paper, planned, estimate, measured, baseline, seconds))

    _print_table(args.dtype, rows)


def _mib(n: float) -> str:
    return f"{n / MIB:10.1f}"


def _print_table(dtype: str, rows: list) -> None:
    """The measured rows side by side with the ZeRO paper, the planner and DeepSpeed's estimator."""
    print()
    print(f"{dtype}, CPU, world size 1, AdamW; MiB (bytes per parameter in brackets)")
    header = (
        f"{'model':<10} {'ZeRO':>4} {'params':>12} | {'paper':>10} {'planner':>10} {'DS est.':>10} | "
        f"{'measured':>10} {'= params':>9} {'+ grads':>9} {'+ optim':>9} {'live Δ':>10} | "
        f"{'meas/plan':>9} {'meas/DS':>8} {'time':>6}"
    )
    print(header)
    print("-" * len(header))
    for preset, stage, p, paper, planned, estimate, m, baseline, seconds in rows:
        ds_gpu = _mib(estimate.gpu) if estimate else f"{'n/a':>10}"
        ds_ratio = f"{m.total / estimate.gpu:8.3f}" if estimate else f"{'n/a':>8}"
        print(
            f"{preset:<10} {stage:>4} {p:>12,} | {_mib(paper.gpu)} {_mib(planned.gpu)} {ds_gpu} | "
            f"{_mib(m.total)} {m.params / MIB:9.1f} {m.grads / MIB:9.1f} {m.optimizer / MIB:9.1f} "
            f"{_mib(m.live - baseline)} | {m.total / (planned.held + planned.update):9.3f} {ds_ratio} {seconds:5.1f}s"
        )

        def per(n: float, p: int = p) -> str:
            return f"{n / p:.2f}"

        print(
            f"{'':<10} {'':>4} {'':>12} | {'[' + per(paper.gpu) + ']':>10} {'[' + per(planned.gpu) + ']':>10} "
            f"{('[' + per(estimate.gpu) + ']') if estimate else '':>10} | {'[' + per(m.total) + ']':>10} "
            f"{'[' + per(m.params) + ']':>9} {'[' + per(m.grads) + ']':>9} {'[' + per(m.optimizer) + ']':>9} "
            f"{'[' + per(m.live - baseline) + ']':>10} |"
        )
        print(
            f"{'':<10} {'':>4} {'':>12} | planner: params {per(planned.params)} + grads {per(planned.grads)} "
            f"+ optimizer {per(planned.optimizer)} held, + max(ZeRO-3 gathered module {per(planned.working_set)}, "
            f"update copies {per(planned.update)}) bytes per parameter"
        )


if __name__ == "__main__":
    main()
