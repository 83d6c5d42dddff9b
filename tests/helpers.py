"""What tests share: paths, launching runs (the real launcher, each in its own process session), reading
what a run wrote, comparing runs. Fixtures and hooks are in conftest.py; services in services.py.

Imports here are light (the standard library and pytest); torch, numpy, psutil and ds_trainer are imported
where used, so conftest can import this module before it sets the environment the suite runs in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"

# What /tmp held before the suite (conftest imports this module first): tests/test_hygiene.py checks the
# suite added nothing but pytest's own root.
TMP_BEFORE = frozenset(os.listdir(tempfile.gettempdir()))


def under_ci() -> bool:
    """CI counts as set for any value but empty, `0` or `false`: then a missing service fails, not skips."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


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


def pretrain_command(args: list[str], ranks: int = 1, env: dict | None = None) -> tuple[list[str], dict]:
    """launch/pretrain.py in one plain process (ranks=0) or under the real `deepspeed` launcher."""
    script = str(REPO / "launch" / "pretrain.py")
    if ranks == 0:
        cmd = [sys.executable, script, *args]
    else:
        from ds_trainer.process import free_port

        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    return cmd, full_env


# Every launch a test makes starts its own process session, so that the whole tree (launcher, ranks, the
# pdsh/ssh clients of a multi-node launch) can be killed at once; `end_launches` kills what is left.
LAUNCHED: list[subprocess.Popen] = []
# Marks every launch of this test session, so the last test can find what it left behind.
SESSION_MARK = "DS_TRAINER_TEST_SESSION"


def launch(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Popen in a new process session, remembered for `end_launches`."""
    full_env = {**(env or os.environ), SESSION_MARK: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=full_env, cwd=kwargs.pop("cwd", REPO), start_new_session=True, **kwargs)
    LAUNCHED.append(proc)
    return proc


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the launch's whole process session (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def run_launch(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Like subprocess.run(capture_output=True, text=True), in its own session, killed whole on timeout."""
    proc = launch(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_session(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_pretrain(
    args: list[str], ranks: int = 1, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd, full_env = pretrain_command(args, ranks, env)
    return run_launch(cmd, full_env, timeout)


def start_pretrain(args: list[str], ranks: int = 1, env: dict | None = None, log: Path | None = None):
    """Like run_pretrain, without waiting: a Popen whose output goes to `log`."""
    cmd, full_env = pretrain_command(args, ranks, env)
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    return launch(cmd, full_env, stdout=out, stderr=subprocess.STDOUT)


def leftover_processes(marker: str) -> list:
    """Live processes of launch/pretrain.py or launch/resilient.py whose command line names `marker`
    (a run folder, the session's temporary root) or whose environment carries this session's mark:
    remote ranks on the test hosts are found by the first, local ones by either."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if not any(a.endswith(("pretrain.py", "resilient.py")) for a in cmd):
            continue
        try:
            marked = proc.environ().get(SESSION_MARK) == str(os.getpid())
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            marked = False
        if marked or any(marker in a for a in cmd):
            found.append(proc)
    return found


def kill_processes(procs: list) -> None:
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


def rank_processes(run_dir: Path) -> list:
    """Live rank processes of the run in `run_dir`, stopped ones included: those the `pkill -f` pattern of
    ds_trainer.supervisor (the one the batch script and the supervisor signal) matches."""
    import psutil

    from ds_trainer.supervisor import rank_pattern

    pattern = re.compile(rank_pattern("pretrain.py", "--checkpoint.dir", str(run_dir)))
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if pattern.search(cmd) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> int:
    """Block until metrics.jsonl shows a train step >= `step`; returns the newest step seen."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = run_dir / "metrics.jsonl"
        if f.is_file():
            steps = [json.loads(line)["step"] for line in f.read_text().splitlines() if "train/loss" in line]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.2)
    raise TimeoutError(f"{run_dir} did not reach step {step} in {timeout} s")


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["val/loss"] for m in read_metrics(run_dir) if "val/loss" in m}


def samples(run_dir: Path) -> dict[int, str]:
    """The text generated from eval.sample_prompt at each evaluation, by step."""
    return {m["step"]: m["samples/text"] for m in read_metrics(run_dir) if "samples/text" in m}


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


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def requires_libaio() -> None:
    """NVMe offload needs libaio; outside CI a machine without it skips, under CI=true it must not."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        if under_ci():
            pytest.fail("libaio is missing under CI: .ci/run must apt-get install libaio-dev")
        pytest.skip("libaio missing: apt-get install libaio-dev")


def all_tensors(folder: Path) -> dict:
    """Every tensor in every DeepSpeed file of a checkpoint, keyed by file and path inside it."""
    import torch

    out = {}

    def walk(obj, key):
        if isinstance(obj, torch.Tensor):
            out[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    for f in sorted(folder.glob("*_states.pt")):
        walk(torch.load(f, map_location="cpu", weights_only=False), f.name)
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


# Plain SGD, no momentum, no clipping: the update is lr x gradient, so a gradient off by a constant factor
# (a 1/ranks or 1/accumulation lost, or applied twice) changes every later loss and weight. AdamW's update
# and norm clipping both divide such a factor out: runs with them stay "equal" through it.
SGD_LR = 0.5  # gpt2-tiny: loss 10.8 -> 8.2 in 20 steps; at 1.0 it already jumps about
ADAMW_LR = 3e-3


def sgd(path: Path, base: str, **changes) -> Path:
    """The ds_configs/ file in fp32, training with plain SGD and no gradient clipping."""
    return fp32(
        path,
        base,
        optimizer={"type": "SGD", "params": {"lr": "auto", "momentum": 0}},
        gradient_clipping=0,  # off; DeepSpeed 0.19 clips at 1.0 when the key is absent
        zero_allow_untested_optimizer=True,
        **changes,
    )


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Module weights of the checkpoint at `step`, from DeepSpeed's model-states file (ZeRO 0-2)."""
    import torch

    states = torch.load(run_dir / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def grad_norms(run_dir: Path) -> dict[int, float]:
    """The logged gradient norm before clipping, by step."""
    return {m["step"]: m["train/grad_norm"] for m in read_metrics(run_dir) if "train/grad_norm" in m}


def consolidated_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's fp32 weights under the plain GPT's names, from any layout (ZeRO 0-3, stages)."""
    from ds_trainer.export import checkpoint_folder, consolidated_state_dict

    return {k: v.detach() for k, v in consolidated_state_dict(checkpoint_folder(run_dir, None))[0].items()}


def assert_same_training(
    got: Path,
    want: Path,
    steps: int,
    loss_atol: float = 1e-5,
    norm_rtol: float = 1e-5,
    weight_atol: float | None = 1e-5,
) -> None:
    """Every step's loss and gradient norm, and the final weights (unless weight_atol is None), of the
    run in `got` equal `want`'s.

    The norm is logged before clipping, so it moves with the gradient's scale whatever the optimizer;
    the losses after step 1 and the weights do too under SGD. Prints the largest differences first.
    """
    import numpy as np
    import torch

    series = {}
    for name, run in (("got", got), ("want", want)):
        loss, norm = losses(run), grad_norms(run)
        assert sorted(loss) == sorted(norm) == list(range(1, steps + 1)), (name, sorted(loss), sorted(norm))
        series[name] = [loss[s] for s in sorted(loss)], [norm[s] for s in sorted(norm)]
    (loss_got, norm_got), (loss_want, norm_want) = series["got"], series["want"]
    w_got, w_want, weight_diff = {}, {}, {"(not compared)": float("nan")}
    if weight_atol is not None:
        w_got, w_want = consolidated_weights(got), consolidated_weights(want)
        assert w_got.keys() == w_want.keys()
        weight_diff = {k: float((w_got[k] - w_want[k]).abs().max()) for k in w_want}
    worst = max(weight_diff, key=weight_diff.get)
    print(
        f"{got} vs {want}: max |loss diff| {np.max(np.abs(np.subtract(loss_got, loss_want))):.2e}, "
        f"max relative grad-norm diff {np.max(np.abs(np.divide(norm_got, norm_want) - 1)):.2e}, "
        f"max |weight diff| {weight_diff[worst]:.2e} ({worst})"
    )
    np.testing.assert_allclose(norm_got, norm_want, rtol=norm_rtol, atol=0, err_msg="gradient norms")
    np.testing.assert_allclose(loss_got, loss_want, rtol=0, atol=loss_atol, err_msg="losses")
    for k in w_want:
        torch.testing.assert_close(
            w_got[k], w_want[k], rtol=0, atol=weight_atol, msg=lambda m, k=k: f"final weights {k}: {m}"
        )


def books_lr(k: float, initial: float, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """The from-scratch books' schedule at step k (from 0), written out as their training loop has it: a
    linear warm-up from initial to peak, then a cosine from peak at k = warmup to min_lr at k = total."""
    if k < warmup:
        return initial + k * (peak - initial) / warmup
    progress = (k - warmup) / (total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def ds_formula_lr(k: int, lr: float, total: int, warmup: int, warmup_min: float, cos_min: float) -> float:
    """WarmupCosineLR with linear warm-up at iteration k, written from its documented definition."""
    warmup = max(2, warmup)
    if k < warmup:
        return lr * (warmup_min + (1 - warmup_min) * k / warmup)
    progress = min(1.0, (k - warmup + 1) / max(1, total - warmup))
    return lr * max(0.0, cos_min + (1 - cos_min) * (1 + math.cos(math.pi * progress)) / 2)
