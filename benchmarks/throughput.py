"""ds_trainer against a plain PyTorch loop: the same model class, batch, data and clipping, tokens/s and MFU
side by side, alternating in one run, min/median/max over repeats.

Each measurement is its own process: `launch/pretrain.py` (ZeRO-0 JSON, fp32 or bf16; compiled with
`--train.compile true`) and the plain loop written below (`torch.optim.AdamW`, fused where PyTorch has it;
bf16 by autocast, as nanoGPT does; compiled with `torch.compile(model)`). Both skip their first steps
(allocation, kernel choice, compilation) and time the rest. The peak behind MFU is one matmul probe in the
run's dtype (ds_trainer/flops.py), shared by both sides.

TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python benchmarks/throughput.py [--repeats 3 --steps 15]
    [--shapes small,appendix_d] [--dtypes fp32,bf16] [--modes eager,compiled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WARMUP = 5  # steps left out of every figure: ds_trainer's first log interval (compilation included), the same
# for the loop. ds_trainer logs every 5 steps (users' default is 10): a log step also measures the gradient norm.

# name: (model overrides, micro-batch, corpus, dtypes it runs in)
SHAPES = {
    # nanoGPT's shape in the table: 6 layers x 384, context 256, batch 8.
    "small": (
        {"preset": None, "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
        8,
        "tinyshakespeare.txt",
        ("fp32", "bf16"),
    ),
    # The books' appendix-D settings: GPT-2 124M shape, context 256, untied head, no QKV bias, batch 2.
    "appendix_d": (
        {"preset": "gpt2", "block_size": 256, "qkv_bias": False, "tie_embeddings": False},
        2,
        "the-verdict.txt",
        ("fp32",),
    ),
}


def gpt_config(shape: str):
    from ds_trainer.model import GPTConfig

    model, _, _, _ = SHAPES[shape]
    overrides = {k: v for k, v in model.items() if k != "preset"}
    return GPTConfig.from_preset(model["preset"], **overrides) if model["preset"] else GPTConfig(**overrides)


def ds_trainer_command(shape: str, dtype: str, mode: str, steps: int, tmp: Path) -> tuple[list[str], Path]:
    """The launch/pretrain.py command line for one case, and the run folder its metrics.jsonl lands in."""
    model, batch, corpus, _ = SHAPES[shape]
    ds = json.loads((REPO / "ds_configs" / "zero0.json").read_text())
    ds["bf16"] = {"enabled": dtype == "bf16"}
    (tmp / "ds.json").write_text(json.dumps(ds))
    run = tmp / f"run_{shape}_{dtype}_{mode}_{time.monotonic_ns()}"
    args = [f"--model.{k}={'null' if v is None else v}" for k, v in model.items()] + [
        f"--data.path={DATA / corpus}", f"--data.context_length={model['block_size']}",
        f"--train.micro_batch_size={batch}", f"--train.max_steps={steps}", "--eval.interval=0",
        "--log.interval=5", f"--checkpoint.dir={run}", "--checkpoint.save_interval=0", "--guard.spike_factor=0",
        f"--train.compile={mode == 'compiled'}",
    ]  # fmt: skip
    return [
        sys.executable,
        str(REPO / "launch" / "pretrain.py"),
        "--ds_config",
        str(tmp / "ds.json"),
        *args,
    ], run


def tokens_per_sec(shape: str, run: Path) -> float:
    """Tokens/s over the logged steps after the first WARMUP, from a finished run's metrics.jsonl."""
    model, batch, _, _ = SHAPES[shape]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r["perf/step_ms"] for r in records if "perf/step_ms" in r and r["step"] > WARMUP]
    return batch * model["block_size"] / (sum(timed) / len(timed) / 1000)


def ds_trainer_tokens_per_sec(shape: str, dtype: str, mode: str, steps: int, tmp: Path) -> float:
    cmd, run = ds_trainer_command(shape, dtype, mode, steps, tmp)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return tokens_per_sec(shape, run)


def plain_loop(shape: str, dtype: str, mode: str, steps: int) -> float:
    """The loop a user writes by hand: forward, backward, clip at 1.0, AdamW; returns tokens/s."""
    import torch

    from ds_trainer.data import build_datasets
    from ds_trainer.model import GPT

    cfg = gpt_config(shape)
    _, batch, corpus, _ = SHAPES[shape]
    torch.manual_seed(0)
    model = GPT(cfg).train()
    step_model = torch.compile(model) if mode == "compiled" else model
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device and PyTorch
        opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    train, _, _ = build_datasets(
        {str(DATA / corpus): 1.0}, cfg.block_size, cfg.block_size, None, cfg.vocab_size
    )
    g = torch.Generator().manual_seed(0)
    n = train.sizes()[0]
    seconds = 0.0
    for step in range(1, steps + 1):
        ids = [(0, int(i)) for i in torch.randint(n, (batch,), generator=g)]
        started = time.perf_counter()
        x, y = train.batch(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the same host sync ds_trainer's logger makes each logged step
        if step > WARMUP:
            seconds += time.perf_counter() - started
    return batch * cfg.block_size * (steps - WARMUP) / seconds


def stats(xs: list[float]) -> str:
    return f"{min(xs):,.0f} / {statistics.median(xs):,.0f} / {max(xs):,.0f}"


def repeats_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark over SHAPES takes: repeats, steps per run, shapes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15, help="a multiple of 5")
    parser.add_argument("--shapes", default="small,appendix_d")
    return parser


def main() -> None:
    parser = repeats_parser(__doc__)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--plain", nargs=3, metavar=("SHAPE", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:  # one measurement of the plain loop, in its own process
        print(json.dumps(plain_loop(*args.plain, args.steps)))
        return
    from ds_trainer.flops import cpu_peak_tflops, flops_per_token

    cases = [
        (s, d, m)
        for s in args.shapes.split(",")
        for d in args.dtypes.split(",")
        if d in SHAPES[s][3]
        for m in args.modes.split(",")
    ]
    ours: dict[tuple[str, str, str], list[float]] = {c: [] for c in cases}
    plain: dict[tuple[str, str, str], list[float]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        for r in range(args.repeats):
            for case in cases:  # alternating, so a drift in the machine's speed hits both sides alike
                ours[case].append(ds_trainer_tokens_per_sec(*case, args.steps, Path(tmp)))
                cmd = [sys.executable, __file__, "--plain", *case, "--steps", str(args.steps)]
                out = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout
                plain[case].append(float(out.strip().splitlines()[-1]))
                print(
                    f"repeat {r + 1} {' '.join(case)}: ds_trainer {ours[case][-1]:,.0f}, "
                    f"plain {plain[case][-1]:,.0f} tok/s",
                    flush=True,
                )
    peaks = {d: cpu_peak_tflops(d) for d in {d for _, d, _ in cases}}
    print(f"\n{args.steps} steps ({WARMUP} left out), {args.repeats} repeats; peak by matmul probe: "
          + ", ".join(f"{d} {p:.3g} TFLOP/s" for d, p in peaks.items()))  # fmt: skip
    print(
        "| shape | dtype | mode | plain loop tok/s (min / median / max) | ds_trainer tok/s | ratio | MFU ours |"
    )
    print("|---|---|---|---|---|---|---|")
    median = {c: (statistics.median(ours[c]), statistics.median(plain[c])) for c in cases}
    for shape, dtype, mode in cases:
        mine, theirs = median[shape, dtype, mode]
        cfg = gpt_config(shape)
        mfu = mine * flops_per_token(cfg, cfg.block_size) / 1e12 / peaks[dtype]
        print(f"| {shape} | {dtype} | {mode} | {stats(plain[shape, dtype, mode])} | "
              f"{stats(ours[shape, dtype, mode])} | {mine / theirs:.2f}x | {mfu:.1%} |")  # fmt: skip
    print("\nGoal: ds_trainer at its best against the plain loop as written by hand (eager), medians:")
    for shape, dtype in dict.fromkeys((s, d) for s, d, _ in cases):
        best = max((median[c][0], c[2]) for c in cases if c[:2] == (shape, dtype))
        if (shape, dtype, "eager") in median:
            goal = 1.0 if shape == "appendix_d" else 1.05
            ratio = best[0] / median[shape, dtype, "eager"][1]
            print(f"  {shape} {dtype}: ds_trainer {best[1]} / plain eager = {ratio:.2f}x (goal >= {goal:.2f}x: "
                  f"{'met' if ratio >= goal else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    main()
