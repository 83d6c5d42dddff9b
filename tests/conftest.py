"""Test hygiene: offline tokenizer, a known torch-extensions folder, temp run folders, real launcher runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"

# Set before any test imports tiktoken or DeepSpeed, and inherited by every launched rank.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ds_trainer_torch_extensions"))


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shared_memory():
    """Runs killed during start-up leave DeepSpeed's 64 MiB all-reduce buffers in /dev/shm; sweep them."""
    from ds_trainer.engine import remove_stale_shm_buffers

    remove_stale_shm_buffers()
    yield
    remove_stale_shm_buffers()


@pytest.fixture(scope="session")
def verdict_path() -> Path:
    p = DATA / "the-verdict.txt"
    if not p.is_file():
        pytest.fail(f"{p} is missing: the tests read the shared corpora from ../shared/data")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ds_config(path: Path, base: str = "zero0", **changes) -> Path:
    """A ds_configs/ file with top-level keys replaced (None removes a key), written to `path`."""
    cfg = json.loads((REPO / "ds_configs" / f"{base}.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))
    return path


def fp32(path: Path, base: str, **changes) -> Path:
    """The ds_configs/ file in fp32: this CPU has no native bf16, so equality tests run in fp32."""
    return write_ds_config(path, base, bf16={"enabled": False}, **changes)


def run_pretrain(
    args: list[str], ranks: int = 1, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """launch/pretrain.py in one plain process (ranks=0) or under the real `deepspeed` launcher."""
    script = str(REPO / "launch" / "pretrain.py")
    if ranks == 0:
        cmd = [sys.executable, script, *args]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def tiny_args(run_dir: Path, data: Path | None, steps: int = 20, **extra: object) -> list[str]:
    """A fast gpt2-tiny run: short context, logging every step, no eval unless asked."""
    opts = {
        "model.preset": "gpt2-tiny",
        **({} if data is None else {"data.path": str(data)}),
        "data.context_length": 32,
        "train.max_steps": steps,
        "train.micro_batch_size": 2,
        "eval.interval": 0,
        "checkpoint.dir": str(run_dir),
        "checkpoint.save_interval": 0,
        "log.interval": 1,
        **extra,
    }
    out = []
    for k, v in opts.items():
        out += [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="session")
def process_group():
    """One single-rank process group for in-process engine tests, torn down at the end of the session."""
    import deepspeed.comm as dist

    from ds_trainer.engine import init_distributed

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    init_distributed()
    yield
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    dist.cdb = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def requires_libaio() -> None:
    """NVMe offload needs libaio; outside CI a machine without it skips, under CI=true it must not."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        if os.environ.get("CI") == "true":
            pytest.fail("libaio is missing under CI=true: .ci/run must apt-get install libaio-dev")
        pytest.skip("libaio missing: apt-get install libaio-dev")
