"""Optimizer parameter groups: weight decay on linear-layer matrices only."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch.nn as nn

from ds_trainer.engine import parameter_groups
from ds_trainer.model import GPT, GPTConfig

TINY = GPTConfig.from_preset("gpt2-tiny")


def group_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Names of the parameters in the decay and no-decay groups (a tied weight under its first name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = parameter_groups(model)
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def linear_weights(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_group_options():
    decay, no_decay = parameter_groups(GPT(TINY))
    assert "weight_decay" not in decay  # takes the optimizer's weight decay
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_exactly_once(tie):
    model = GPT(replace(TINY, tie_embeddings=tie))
    decay, no_decay = parameter_groups(model)
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_parameters()


@pytest.mark.parametrize("tie", [True, False])
def test_decay_all_parameters_is_one_group_of_every_parameter(tie):
    """train.decay_all_parameters: the books' AdamW(model.parameters()), every weight decayed once."""
    model = GPT(replace(TINY, tie_embeddings=tie))
    (group,) = parameter_groups(model, decay_all=True)
    assert "weight_decay" not in group  # the optimizer's weight decay for all
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_tied_model_groups():
    model = GPT(TINY)
    decay, no_decay = group_names(model)
    assert decay == linear_weights(model) - {"lm_head.weight"}
    assert len(decay) == 4 * TINY.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert {
        "wte.weight",
        "wpe.weight",
        "ln_f.weight",
        "ln_f.bias",
        "h.0.ln_1.weight",
        "h.0.attn.c_attn.bias",
    } <= no_decay
    assert all(n.endswith("bias") or ".ln_" in f".{n}" or n.startswith("w") for n in no_decay)


def test_untied_head_weight_decays():
    model = GPT(replace(TINY, tie_embeddings=False))
    decay, no_decay = group_names(model)
    assert "lm_head.weight" in decay
    assert decay == linear_weights(model)
    assert "wte.weight" in no_decay


def test_frozen_parameters_are_left_out():
    model = GPT(TINY)
    model.wpe.weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model)
    assert all(p is not model.wpe.weight for p in decay["params"] + no_decay["params"])


@pytest.mark.slow
def test_zero3_ranks_hold_only_their_partition_from_construction(tmp_path):
    import json
    import subprocess

    from helpers import REPO, fp32

    from ds_trainer.process import free_port

    figures = {}
    for base in ("zero0", "zero3"):
        out = tmp_path / base
        ds = fp32(tmp_path / f"{base}.json", base)
        cmd = [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            str(REPO / "tests" / "probes" / "zero_memory.py"),
            str(out),
            str(ds),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        figures[base] = [json.loads((tmp_path / f"{base}.rank{r}").read_text()) for r in (0, 1)]
    for base in ("zero0", "zero3"):  # built under zero.Init or not, the weights are GPT-2's initialisation
        assert [r["weights_differing_from_plain_gpt"] for r in figures[base]] == [[], []], figures[base]
    for rank in figures["zero3"]:
        assert rank["partitioned_at_construction"]
        assert rank["param_elements_held"] <= rank["param_elements_full"] / 2 * 1.01
    for rank in figures["zero0"]:
        assert not rank["partitioned_at_construction"]
        assert rank["param_elements_held"] == rank["param_elements_full"]
    for rank in (0, 1):
        z0, z3 = (figures[b][rank]["model_and_optimizer_bytes"] for b in ("zero0", "zero3"))
        print(
            f"rank {rank}: parameters + optimizer state ZeRO-0 {z0 / 2**20:.1f} MiB, ZeRO-3 {z3 / 2**20:.1f} MiB"
        )
        # About half: parameters, gradients' home and Adam states are all split in two.
        assert 0.4 < z3 / z0 < 0.65, figures


@pytest.mark.slow
def test_activation_checkpointing_same_numbers_less_memory():
    import json
    import subprocess
    import sys

    from helpers import REPO

    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "activation_checkpointing_memory.py"),
        "--context",
        "1024",
        "--n_layer",
        "6",
        "--micro",
        "2",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loss_diff"] <= 1e-5 and result["grad_norm_rel_diff"] <= 1e-5
    assert result["ratio"] < 0.9, result


@pytest.mark.slow
def test_activation_checkpointing_trains_to_the_same_losses(tmp_path, verdict_path):
    import numpy as np
    from helpers import fp32, losses, run_pretrain, tiny_args

    # Every option of the JSON section on: partitioning (a no-op without tensor parallelism), copies of the
    # checkpoints in host memory, and one contiguous buffer for them.
    every_option = {
        "partition_activations": True,
        "cpu_checkpointing": True,
        "contiguous_memory_optimization": True,
        "number_checkpoints": "auto",
    }
    variants = {  # name: (shipped JSON, changes)
        "zero1": ("zero1", {}),
        "zero1_activation_checkpointing": ("zero1_activation_checkpointing", {}),
        "every_option": ("zero1_activation_checkpointing", {"activation_checkpointing": every_option}),
    }
    got = {}
    for name, (base, extra) in variants.items():
        ds = fp32(tmp_path / f"{name}.json", base, **extra)
        # Dropout on: recomputation must redraw the forward's masks (DeepSpeed restores the RNG state).
        args = tiny_args(tmp_path / name, verdict_path, 8, **{"model.dropout": 0.1})
        proc = run_pretrain(["--ds_config", str(ds), *args], ranks=0)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[name] = losses(tmp_path / name)
    a = got["zero1"]
    for name in ("zero1_activation_checkpointing", "every_option"):
        b = got[name]
        assert sorted(b) == list(range(1, 9))
        np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], atol=1e-5, rtol=0)


# DeepSpeed's activation-checkpointing settings live in module globals that `configure` overwrites; the
# tests put them back so that no later test inherits (say) contiguous buffers it did not ask for.
CHECKPOINTING_GLOBALS = (
    "PARTITION_ACTIVATIONS",
    "CPU_CHECKPOINT",
    "CONTIGUOUS_CHECKPOINTING",
    "num_layers",
    "SYNCHRONIZE",
    "PROFILE_TIME",
    "deepspeed_checkpointing_enabled",
)


def resolve_shipped(name: str, n_layer: int, dropout: float = 0.0, **changes):
    """A ds_configs/ JSON resolved for a one-rank CPU run (fp32: this CPU has no native bf16)."""
    from helpers import REPO

    from ds_trainer.config import load_run_config
    from ds_trainer.ds_config import load_ds_json, resolve

    raw, source = load_ds_json(str(REPO / "ds_configs" / f"{name}.json"))
    raw.update(bf16={"enabled": False}, **changes)
    run = load_run_config(
        None,
        ["--model.n_layer", str(n_layer), "--model.dropout", str(dropout), "--train.max_steps", "1"],
    )
    return resolve(raw, source, run, 1, 1000, "cpu"), run.gpt_config()


def block_forward_counts(model: GPT, x) -> tuple[list[int], float, dict]:
    """Forward calls of each Block during one forward + backward; the loss; the gradients."""
    counts = [0] * len(model.h)
    hooks = [
        block.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, block in enumerate(model.h)
    ]
    try:
        model.train()
        loss = model(x, x)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return counts, float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


EVERY_OPTION = {
    "partition_activations": True,
    "cpu_checkpointing": True,
    "contiguous_memory_optimization": True,
    "number_checkpoints": "auto",
    "synchronize_checkpoint_boundary": True,
    "profile": False,
}


@pytest.mark.parametrize("variant", ["shipped", "every_option", "none"])
def test_activation_checkpointing_section_configures_deepspeed_and_recomputes(
    variant, process_group, monkeypatch
):
    """build_model turns the JSON section into DeepSpeed's checkpoint around every block, with the
    section's settings in DeepSpeed's globals; each block then runs forward twice per step (once in
    forward, once recomputed in backward), and the gradients are those of the plain model, dropout
    included (DeepSpeed restores the RNG state before recomputing)."""
    import deepspeed
    import torch
    from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

    from ds_trainer.engine import build_model

    for name in CHECKPOINTING_GLOBALS:
        monkeypatch.setattr(ds_ckpt, name, getattr(ds_ckpt, name))
    n_layer = 3  # not DeepSpeed's default for anything, so num_layers must come from the section
    if variant == "none":
        ds, cfg = resolve_shipped("zero1", n_layer, dropout=0.1)
        assert "activation_checkpointing" not in ds.config
    else:
        changes = {"activation_checkpointing": dict(EVERY_OPTION)} if variant == "every_option" else {}
        ds, cfg = resolve_shipped("zero1_activation_checkpointing", n_layer, dropout=0.1, **changes)
    torch.manual_seed(0)
    model = build_model(cfg, ds)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)  # the same dropout masks in both models' forward
    counts, loss, grads = block_forward_counts(model, x)

    torch.manual_seed(0)
    plain = GPT(cfg)
    torch.manual_seed(7)
    plain_counts, plain_loss, plain_grads = block_forward_counts(plain, x)
    assert plain_counts == [1] * n_layer

    if variant == "none":
        assert model.checkpoint_fn is None
        assert counts == [1] * n_layer
    else:
        section = ds.config["activation_checkpointing"]
        assert section["number_checkpoints"] == n_layer  # "auto": one per block
        assert model.checkpoint_fn is deepspeed.checkpointing.checkpoint
        assert ds_ckpt.deepspeed_checkpointing_enabled is True
        assert ds_ckpt.PARTITION_ACTIVATIONS is section["partition_activations"]
        assert ds_ckpt.CPU_CHECKPOINT is section["cpu_checkpointing"]
        assert ds_ckpt.CONTIGUOUS_CHECKPOINTING is section["contiguous_memory_optimization"]
        assert ds_ckpt.num_layers == n_layer
        assert ds_ckpt.SYNCHRONIZE is section["synchronize_checkpoint_boundary"]
        assert ds_ckpt.PROFILE_TIME is section["profile"]
        assert counts == [2] * n_layer
    assert loss == plain_loss
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=0, msg=name)


def test_stale_build_locks_are_removed(tmp_path):
    from ds_trainer.ops import remove_stale_build_locks

    (tmp_path / "py311_cpu" / "cpu_adam").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "cpu_adam" / "lock").write_text("")
    (tmp_path / "py311_cpu" / "cpu_adam" / "cpu_adam.so").write_text("built")
    (tmp_path / "lock").write_text("")
    removed = remove_stale_build_locks(str(tmp_path))
    assert sorted(removed) == sorted(
        [str(tmp_path / "lock"), str(tmp_path / "py311_cpu" / "cpu_adam" / "lock")]
    )
    assert (
        not list(tmp_path.rglob("lock")) and (tmp_path / "py311_cpu" / "cpu_adam" / "cpu_adam.so").is_file()
    )


def test_stale_shm_buffers_are_removed_and_mapped_ones_kept(tmp_path):
    import mmap

    from ds_trainer.ds_internals import SHM_PREFIX
    from ds_trainer.process import remove_stale_shm_buffers

    stale, live, other = (
        (tmp_path / f"{SHM_PREFIX}0_x_1_0"),
        (tmp_path / f"{SHM_PREFIX}0_x_1_1"),
        tmp_path / "x",
    )
    for f in (stale, live, other):
        f.write_bytes(b"\0" * 4096)
    with open(live, "r+b") as fh, mmap.mmap(fh.fileno(), 4096):
        assert remove_stale_shm_buffers(tmp_path) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


END_PROCESS_SCRIPT = """
import atexit, logging, sys
from ds_trainer.process import end_process
atexit.register(lambda: print("finalized", flush=True))
logging.basicConfig(filename=sys.argv[1])
logging.getLogger("ds_trainer").warning("logged before the end")
sys.stdout.write("stdout without newline")  # block-buffered into a pipe until flushed
sys.stderr.write("stderr without newline")
end_process(3)
"""


def test_end_process_keeps_code_and_output_and_skips_teardown(tmp_path):
    log = tmp_path / "log.txt"
    proc = subprocess.run(
        [sys.executable, "-c", END_PROCESS_SCRIPT, str(log)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout.endswith("stdout without newline") and "finalized" not in proc.stdout
    assert proc.stderr.endswith("stderr without newline")
    assert log.read_text() == "WARNING:ds_trainer:logged before the end\n"


@pytest.mark.slow
def test_two_rank_run_leaves_no_shared_memory_behind(tmp_path, verdict_path):
    from helpers import run_pretrain, tiny_args

    from ds_trainer.ds_internals import SHM_DIR, SHM_PREFIX

    before = set(SHM_DIR.glob(SHM_PREFIX + "*"))
    r = run_pretrain(tiny_args(tmp_path / "run", verdict_path, steps=2), ranks=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(SHM_DIR.glob(SHM_PREFIX + "*")) - before == set()


def one_rank_engine(model: nn.Module, stage: int):
    """The engine build_engine makes over `model` for one rank with the built-in JSON at ZeRO `stage`."""
    import copy

    from ds_trainer.config import load_run_config
    from ds_trainer.ds_config import DEFAULT_DS_CONFIG, resolve
    from ds_trainer.engine import build_engine

    raw = copy.deepcopy(DEFAULT_DS_CONFIG)
    raw["zero_optimization"] = {"stage": stage}
    ds = resolve(raw, "test", load_run_config(None, ["--train.max_steps", "1"]), 1, 1000, "cpu")
    return build_engine(model, ds)


@pytest.mark.parametrize("stage", [0, 2])
def test_no_decay_group_survives_deepspeed_initialize(stage, process_group):
    """DeepSpeed rebuilds the optimizer's groups (ZeRO-2 flattens them); the no-decay group must keep 0."""
    from ds_trainer.ds_internals import innermost_optimizer

    model = GPT(TINY)
    sizes = [sum(p.numel() for p in g["params"]) for g in parameter_groups(model)]
    engine = one_rank_engine(model, stage)
    groups = innermost_optimizer(engine).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    got = [sum(p.numel() for p in g["params"]) for g in groups]
    # ZeRO pads each flat group to an alignment boundary (a few elements).
    assert got == pytest.approx(sizes, abs=64), (got, sizes)


@pytest.mark.parametrize("stage", [0, 1])
def test_a_lone_rank_without_zero_skips_the_gradient_allreduce(stage, process_group):
    """One rank at stage 0: no all-reduce with itself after backward, and the same gradients as plain torch."""
    import copy

    import torch

    torch.manual_seed(0)
    model = GPT(TINY)
    plain = copy.deepcopy(model)
    engine = one_rank_engine(model, stage)
    assert engine.enable_backward_allreduce is (stage != 0)  # ZeRO-1 moves gradients into its partition
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    engine.backward(engine(x, x))
    plain(x, x).backward()
    if stage == 0:
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("base", "ranks"),
    [("zero1_activation_checkpointing", 0), ("zero3", 2)],
    ids=["zero1-activation-checkpointing-1-rank", "zero3-2-ranks"],
)
def test_compiled_runs_train_to_the_eager_losses(tmp_path, verdict_path, base, ranks):
    """train.compile goes through DeepSpeed's engine.compile(): the same losses as eager within 1e-4 (fp32),
    under ZeRO-3 across two ranks and with activation checkpointing, and the compile step is reported."""
    import numpy as np
    from helpers import fp32, losses, read_metrics, run_pretrain, tiny_args

    ds = fp32(tmp_path / "ds.json", base)
    got = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        args = tiny_args(tmp_path / name, verdict_path, 6, **{"train.compile": compiled})
        proc = run_pretrain(["--ds_config", str(ds), *args], ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[name] = losses(tmp_path / name)
    assert sorted(got["compiled"]) == list(range(1, 7))
    np.testing.assert_allclose(
        [got["compiled"][s] for s in range(1, 7)], [got["eager"][s] for s in range(1, 7)], atol=1e-4, rtol=0
    )
    assert "with torch.compile's compilation" in proc.stdout
    records = read_metrics(tmp_path / "compiled")
    (compile_step,) = [m["perf/compile_step_s"] for m in records if "perf/compile_step_s" in m]
    later = [m["perf/step_ms"] / 1000 for m in records if "perf/step_ms" in m and m["step"] > 1]
    assert compile_step > 2 * max(later)
