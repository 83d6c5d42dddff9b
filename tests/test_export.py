"""Export from real checkpoints (ZeRO-0, ZeRO-3 on 2 ranks, 2 pipeline stages) to safetensors and Hugging Face."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, fp32, run_pretrain, tiny_args
from safetensors.torch import load_file

from ds_trainer.model import GPT, GPTConfig


def export(run_dir, out) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "export.py"), "--checkpoint", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def ours(out) -> GPT:
    model = GPT(GPTConfig(**json.loads((out / "config.json").read_text())))
    missing, unexpected = model.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied to wte
    return model.eval()


def huggingface_logits(out, x: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(out / "hf").eval()
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, verdict_path):
    """One short training run per layout, the same seed and data."""
    root = tmp_path_factory.mktemp("export")
    layouts = {
        "zero0": (["--ds_config", str(fp32(root / "z0.json", "zero0"))], 0),
        "zero3": (["--ds_config", str(fp32(root / "z3.json", "zero3"))], 2),
        "pipeline": (["--ds_config", str(fp32(root / "z1.json", "zero1")), "--pipeline.stages", "2"], 2),
    }
    for name, (extra, ranks) in layouts.items():
        micro = 4 if ranks == 0 else 2  # the same global batch of 4 everywhere (2 pipeline micro-batches)
        gas = ["--train.gradient_accumulation_steps", "2"] if name == "pipeline" else []
        args = tiny_args(root / name, verdict_path, 4, **{"train.micro_batch_size": micro})
        proc = run_pretrain([*extra, *args, *gas], ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        export(root / name, root / f"{name}_out")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero0", "zero3", "pipeline"])
def test_export_round_trip_matches_huggingface(layout, runs):
    out = runs / f"{layout}_out"
    x = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours(out)(x)
    torch.testing.assert_close(huggingface_logits(out, x), mine, atol=1e-4, rtol=0)
    # The layouts trained the same model on the same data: their exported weights agree.
    reference = load_file(runs / "zero0_out" / "model.safetensors")
    for k, v in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(v, reference[k], atol=1e-4, rtol=0, msg=k)


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "export.py"),
            "--checkpoint",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        timeout=300,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "no `latest` file" in proc.stderr
