"""Peak host memory of one training step with and without per-block activation checkpointing.

    python benchmarks/activation_checkpointing_memory.py [--context 1024] [--micro 4] [--json]

Each variant runs in a fresh process (peak RSS is per process): the same GPT, the same batch, one
forward and backward of the model ds_trainer builds from ds_configs/zero1_activation_checkpointing.json
(resolved, then engine.build_model), and from the same JSON without its activation_checkpointing section.
Prints peak memory above the model's own footprint for each, their ratio, and the loss difference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "ds_configs" / "zero1_activation_checkpointing.json"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child(checkpointing: bool, context: int, micro: int, n_layer: int, vocab: int) -> dict:
    import torch

    from ds_trainer.config import load_run_config
    from ds_trainer.ds_config import load_ds_json, resolve
    from ds_trainer.engine import build_model
    from ds_trainer.process import init_distributed

    init_distributed()
    # The model as a user's run builds it: the shipped JSON resolved against a run config, then
    # build_model, which reads the activation_checkpointing section. Without checkpointing the same
    # JSON loses only that section. fp32: CPUs without native bf16 would emulate it slowly.
    raw, source = load_ds_json(str(SHIPPED))
    raw["bf16"] = {"enabled": False}
    if not checkpointing:
        del raw["activation_checkpointing"]
    run = load_run_config(
        None,
        [
            *("--model.preset", "null", "--model.n_layer", str(n_layer), "--model.n_head", "4"),
            *("--model.n_embd", "256", "--model.block_size", str(context), "--model.vocab_size", str(vocab)),
            *("--data.context_length", str(context), "--train.micro_batch_size", str(micro)),
            *("--train.max_steps", "1"),
        ],
    )
    ds = resolve(raw, source, run, 1, micro, "cpu")
    torch.manual_seed(0)
    model = build_model(run.gpt_config(), ds)
    if checkpointing != (model.checkpoint_fn is not None):
        raise RuntimeError(
            f"build_model left checkpoint_fn={model.checkpoint_fn!r} for checkpointing={checkpointing}"
        )
    model.train()
    x = torch.randint(0, vocab, (micro, context), generator=torch.Generator().manual_seed(1))
    # A one-token step first: DeepSpeed's checkpoint imports torch._dynamo on its first call (tens of
    # MB), which would otherwise count as activation memory of the checkpointed variant.
    model(x[:1, :1], x[:1, :1]).backward()
    model.zero_grad(set_to_none=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = model(x, x)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad = float(sum(p.grad.double().pow(2).sum() for p in model.parameters()).sqrt())
    return {"peak_above_model_mb": (peak - base) / 1024, "loss": float(loss.detach()), "grad_norm": grad}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--n_layer", type=int, default=8)
    # A small vocabulary keeps the logits (micro x context x vocab floats, which no block checkpoint
    # touches) from hiding the blocks' activations.
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child == "on", a.context, a.micro, a.n_layer, a.vocab)))
        return
    runs = {}
    for mode in ("off", "on"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--context",
            str(a.context),
            "--micro",
            str(a.micro),
            "--n_layer",
            str(a.n_layer),
            "--vocab",
            str(a.vocab),
        ]
        # A child joins its own one-rank group on a free port, never a group this process belongs to.
        env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    result = {
        "without_mb": runs["off"]["peak_above_model_mb"],
        "with_mb": runs["on"]["peak_above_model_mb"],
        "ratio": runs["on"]["peak_above_model_mb"] / runs["off"]["peak_above_model_mb"],
        "loss_diff": abs(runs["on"]["loss"] - runs["off"]["loss"]),
        "grad_norm_rel_diff": abs(runs["on"]["grad_norm"] / runs["off"]["grad_norm"] - 1),
    }
    if a.json:
        print(json.dumps(result))
        return
    print(
        f"GPT {a.n_layer} layers x 256 wide, vocabulary {a.vocab}, context {a.context}, micro batch {a.micro}, fp32, CPU"
    )
    print(f"peak memory of one step above the model, no checkpointing:   {result['without_mb']:8.1f} MB")
    print(f"peak memory of one step above the model, per-block checkpoint: {result['with_mb']:8.1f} MB")
    print(
        f"ratio with/without: {result['ratio']:.3f}; loss difference {result['loss_diff']:.2e}; "
        f"gradient-norm relative difference {result['grad_norm_rel_diff']:.2e}"
    )


if __name__ == "__main__":
    main()
