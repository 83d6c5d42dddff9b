"""Peak host memory of one training step with and without per-block activation checkpointing.

    python benchmarks/activation_checkpointing_memory.py [--context 1024] [--micro 4] [--json]

Each variant runs in a fresh process (peak RSS is per process): the same GPT, the same batch, one
forward and backward through the real ds_trainer path (GPT.checkpoint_fn = DeepSpeed's checkpoint).
Prints peak memory above the model's own footprint for each, their ratio, and the loss difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(checkpointing: bool, context: int, micro: int, n_layer: int, vocab: int) -> dict:
    import os

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29733")
    import deepspeed
    import torch

    from ds_trainer.model import GPT, GPTConfig

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=context, n_layer=n_layer, n_head=4, n_embd=256))
    if checkpointing:
        deepspeed.checkpointing.configure(None, partition_activations=False)
        model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    x = torch.randint(0, vocab, (micro, context), generator=torch.Generator().manual_seed(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = model(x, x)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad = float(sum(p.grad.double().pow(2).sum() for p in model.parameters()).sqrt())
    return {"peak_above_model_mb": (peak - base) / 1024, "loss": float(loss), "grad_norm": grad}


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
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
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
