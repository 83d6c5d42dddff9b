"""The memory and compute planner: parameter counts, agreement with DeepSpeed's estimators and with bytes a
live engine holds, activation formula against saved tensors, compute budget, suggestions, launcher."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import REPO

from benchmarks.plan_measure import measure_model_states, release_engine
from ds_trainer.errors import DsTrainerError
from ds_trainer.model import GPT, PRESETS, GPTConfig
from ds_trainer.planning import (
    ACTIVATION_CHECKPOINTING_SECTION,
    GIB,
    Layout,
    PlanRequest,
    activation_memory,
    count_parameters,
    deepspeed_estimate,
    format_plan,
    model_config,
    model_states,
    plan,
    zero_paper_states,
)

TINY = PRESETS["gpt2-tiny"]
GPT2 = PRESETS["gpt2"]


@functools.cache
def meta_model(cfg: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


# --- parameter count -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        *PRESETS.values(),
        replace(TINY, tie_embeddings=False),
        replace(TINY, qkv_bias=False),
        GPTConfig(n_layer=3, n_head=2, n_embd=48, block_size=64, vocab_size=1000),
    ],
    ids=lambda c: f"{c.n_layer}x{c.n_embd}-tie{int(c.tie_embeddings)}-bias{int(c.qkv_bias)}",
)
def test_parameter_count_matches_the_model(cfg):
    from ds_trainer.engine import parameter_groups

    model = meta_model(cfg)
    counted = count_parameters(cfg)
    assert counted.total == model.num_parameters()
    # DeepSpeed's model_to_params: the most parameters one module owns directly.
    assert counted.largest_layer == max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
    )
    assert counted.groups == tuple(sum(p.numel() for p in g["params"]) for g in parameter_groups(model))
    small = sum(p.numel() for p in model.parameters() if p.numel() < 100_000)
    assert counted.small == small


def test_gpt2_is_124m():
    assert count_parameters(GPT2).total == 124_439_808


# --- model states against DeepSpeed's estimators -------------------------------------------------------

LAYOUTS = [Layout(2), Layout(2, "cpu"), Layout(3), Layout(3, "cpu"), Layout(3, "cpu", "cpu")]


@pytest.mark.parametrize("layout", LAYOUTS, ids=Layout.describe)
@pytest.mark.parametrize("name", ["gpt2-tiny", "gpt2"])
def test_model_states_agree_with_deepspeed_estimators(name, layout):
    counted = count_parameters(PRESETS[name])
    for gpus in (1, 2, 4, 8):
        ours = model_states(counted, layout, "bf16", nodes=1, gpus_per_node=gpus)
        ds = deepspeed_estimate(counted, layout, nodes=1, gpus_per_node=gpus, buffer_factor=1.0)
        assert ds is not None
        assert ours.gpu == pytest.approx(ds.gpu, rel=0.15), (gpus, ours, ds)
        # CPU side (DeepSpeed's buffer factor off): ZeRO-3's offload figures are per node and so are ours.
        # DeepSpeed's ZeRO-2 figure is max(4 x all GPUs, 16) bytes per parameter: the start-up copy
        # dominates from 5 GPUs on, so it is compared up to 4.
        if layout.offload_optimizer != "none" and (layout.stage == 3 or gpus <= 4):
            assert ours.cpu_per_node == pytest.approx(ds.cpu_per_node, rel=0.15), (gpus, ours, ds)


def test_zero2_bf16_matches_deepspeed_terms_for_two_nodes():
    counted = count_parameters(GPT2)
    ours = model_states(counted, Layout(2), "bf16", nodes=2, gpus_per_node=8)
    ds = deepspeed_estimate(counted, Layout(2), nodes=2, gpus_per_node=8)
    assert ours.gpu == pytest.approx(ds.gpu, rel=0.15)
    assert ours.params == 2 * counted.total  # ZeRO-2 keeps the 16-bit weights whole


def test_estimate_is_what_deepspeeds_all_cold_table_prints():
    """We call the functions behind estimate_zero{2,3}_model_states_mem_needs_all_cold with their arguments."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    counted = count_parameters(GPT2)
    for fn, layout, args in (
        (estimate_zero2_model_states_mem_needs_all_cold, Layout(2), {}),
        (estimate_zero2_model_states_mem_needs_all_cold, Layout(2, "cpu"), {}),
        (
            estimate_zero3_model_states_mem_needs_all_cold,
            Layout(3),
            {"largest_layer_params": counted.largest_layer},
        ),
        (
            estimate_zero3_model_states_mem_needs_all_cold,
            Layout(3, "cpu", "cpu"),
            {"largest_layer_params": counted.largest_layer},
        ),
    ):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fn(total_params=counted.total, num_gpus_per_node=4, num_nodes=2, **args)
        ds = deepspeed_estimate(counted, layout, nodes=2, gpus_per_node=4)
        assert f" {ds.cpu_per_node / 2**30:7.2f}GB | {ds.gpu / 2**30:6.2f}GB |" in out.getvalue()


def test_paper_figures_and_partitioning():
    p = count_parameters(GPT2).total
    assert zero_paper_states(p, Layout(0), "bf16").gpu == 16 * p
    assert zero_paper_states(p, Layout(0), "fp32").gpu == 16 * p
    z1 = zero_paper_states(p, Layout(1), "bf16", gpus_per_node=8)
    assert (z1.params, z1.grads, z1.optimizer) == (2 * p, 2 * p, int(12 * p / 8))
    z3 = zero_paper_states(p, Layout(3), "bf16", gpus_per_node=8)
    assert z3.gpu == pytest.approx(16 * p / 8, abs=3)
    off = zero_paper_states(p, Layout(3, "cpu", "cpu"), "bf16", gpus_per_node=8)
    assert off.gpu == 0 and off.cpu_per_node == pytest.approx(16 * p, abs=8)
    # More ranks never need more memory per GPU, and offload moves states off the GPU.
    counted = count_parameters(GPT2)
    for layout in LAYOUTS + [Layout(1), Layout(3, "nvme", "nvme")]:
        one = model_states(counted, layout, "bf16", gpus_per_node=1)
        eight = model_states(counted, layout, "bf16", gpus_per_node=8)
        assert eight.gpu <= one.gpu
    assert model_states(counted, Layout(3, "nvme", "nvme"), "bf16").nvme_per_node > 0


# --- model states against a live engine (fp32, CPU, world size 1) ------------------------------------


def _measure(preset: str, stage: int, context: int = 64, dtype: str = "fp32"):
    from ds_trainer.config import load_run_config
    from ds_trainer.ds_config import load_ds_json, resolve
    from ds_trainer.engine import build_engine, build_model

    run = load_run_config(
        None, ["--model.preset", preset, "--train.micro_batch_size", "1", "--train.max_steps", "4"]
    )
    raw, source = load_ds_json(None)  # fp32 AdamW
    raw["zero_optimization"] = {"stage": stage}
    if dtype == "bf16":
        raw["bf16"] = {"enabled": True}
    ds = resolve(raw, source, run, 1, 1000, "cpu")
    cfg = run.gpt_config()
    torch.manual_seed(0)
    engine = build_engine(build_model(cfg, ds), ds)  # ZeRO-3: constructed inside zero.Init, as runs do
    try:
        measured = measure_model_states(engine, torch.randint(0, cfg.vocab_size, (1, context)))
    finally:
        release_engine(engine)
    return cfg, measured


def _check_measured(preset: str, stage: int, context: int = 64, dtype: str = "fp32") -> None:
    cfg, measured = _measure(preset, stage, context, dtype)
    planned = model_states(count_parameters(cfg), Layout(stage), dtype)
    # Measured at the update: ZeRO-3's gathered module (planned.working_set) exists only in forward and
    # backward, so the update's copies are what the held states peak with here.
    assert measured.total == pytest.approx(planned.held + planned.update, rel=0.15), (measured, planned)
    if stage < 3:
        assert planned.gpu == planned.held + planned.update
    assert measured.params == pytest.approx(planned.params, rel=0.15)
    assert measured.optimizer == pytest.approx(planned.optimizer, rel=0.15)
    # The update's fp32 copies count as gradients in the measurement.
    assert measured.grads == pytest.approx(planned.grads + planned.update, rel=0.15)
    # The walk finds the bulk of what is alive: what else exists is small (the batch, leaked engines
    # of earlier tests aside, which release_engine empties).
    assert measured.live >= measured.total


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_tiny_model_states_match_a_live_engine(stage, process_group):
    _check_measured("gpt2-tiny", stage)


def test_tiny_bf16_zero0_update_copies_match_a_live_engine(process_group):
    """FP16_Optimizer's per-parameter fp32 copies and flat fp32 gradients (bf16 runs, slowly, on the CPU)."""
    _check_measured("gpt2-tiny", 0, dtype="bf16")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_gpt2_model_states_match_a_live_engine(stage, process_group):
    _check_measured("gpt2", stage, context=16)  # model states do not depend on the context; keeps it fast


# --- activations -----------------------------------------------------------------------------------


def _saved_bytes(model: GPT, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (each storage once, parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(saved.values())


def test_activation_formula_matches_saved_tensors_on_cpu():
    """fp32 on the CPU: SDPA's fused kernel (no s x s scores), dropout 0; per-block checkpointing."""
    from torch.utils.checkpoint import checkpoint

    cfg = replace(TINY, n_embd=128, n_head=4, n_layer=3)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    b, s = 2, 128
    x = torch.randint(0, cfg.vocab_size, (b, s))
    a = activation_memory(cfg, b, s, "fp32")
    full = _saved_bytes(model, x)
    assert full - a.logits == pytest.approx(cfg.n_layer * a.per_layer + a.head, rel=0.02)
    model.checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
    kept = _saved_bytes(model, x)
    # In forward a checkpointed model keeps the block inputs; backward adds one block's set and the
    # loss gradients, which the planner's totals include.
    assert kept == pytest.approx(a.checkpointed - a.per_layer - a.loss_backward, rel=0.02)


def test_activation_checkpointing_saves_memory_and_scales_with_micro_batch():
    for name in ("gpt2-tiny", "gpt2", "gpt2-xl"):
        cfg = PRESETS[name]
        one = activation_memory(cfg, 1, cfg.block_size)
        assert one.checkpointed < one.full
        for b in (2, 3, 8):
            more = activation_memory(cfg, b, cfg.block_size)
            assert more.full == b * one.full
            assert more.checkpointed == b * one.checkpointed


def test_korthikanti_formula_with_materialised_attention():
    """attention="math" with dropout is Korthikanti et al.'s s·b·h·(34 + 5·a·s/h) per layer in 16-bit."""
    cfg = replace(GPT2, dropout=0.1)
    s, b, h, a = 1024, 2, cfg.n_embd, cfg.n_head
    act = activation_memory(cfg, b, s, "bf16", attention="math")
    assert act.per_layer == s * b * h * 34 + 5 * a * s * s * b
    flash = activation_memory(cfg, b, s, "bf16")
    assert flash.per_layer < act.per_layer
    assert act.logits == 4 * b * s * cfg.vocab_size


# --- compute ---------------------------------------------------------------------------------------


def test_token_budget_flops_and_time():
    p = plan(PlanRequest("gpt2", zero=2, nodes=1, gpus_per_node=8, mfu=0.5, peak_tflops=1000))
    n = count_parameters(GPT2).total
    assert p.compute.tokens == pytest.approx(2.5e9, rel=0.01)
    assert p.compute.tokens == round(20 * n)
    assert p.compute.flops == 6 * n * p.compute.tokens
    assert p.compute.seconds == pytest.approx(p.compute.flops / (8 * 1000e12 * 0.5))
    assert plan(PlanRequest("gpt2", dtype="fp32")).compute.peak_tflops == 67.0
    assert plan(PlanRequest("gpt2")).compute.peak_tflops == 989.0
    assert plan(PlanRequest("gpt2", tokens=10**9)).compute.flops == 6 * n * 10**9


# --- fit and suggestion ----------------------------------------------------------------------------


def _resolves(config: dict) -> None:
    from ds_trainer.config import load_run_config
    from ds_trainer.ds_config import resolve

    run = load_run_config(None, ["--train.max_steps", "10"])
    resolve(config, "suggested", run, 8, 10_000, "cuda")


def test_gpt2_xl_suggestion_fits_on_one_80gb_gpu():
    for micro in (16, 32, 64):
        p = plan(PlanRequest("gpt2-xl", micro_batch=micro, gpus_per_node=1, gpu_memory_gb=80))
        s = p.suggestion
        assert s is not None
        assert s.need.fits
        assert s.need.gpu <= s.need.gpu_usable < 80 * GIB
        assert s.micro_batch * s.gradient_accumulation_steps == micro
        assert s.config["train_micro_batch_size_per_gpu"] == s.micro_batch
        # The cheapest candidate is plain ZeRO-0 without recomputation, taken exactly when it fits.
        plain = s.base_file == "zero0" and not s.activation_checkpointing and s.micro_batch == micro
        assert plain == p.need.fits
        if s.activation_checkpointing:
            assert s.config["activation_checkpointing"] == ACTIVATION_CHECKPOINTING_SECTION
        _resolves(s.config)
    # From micro batch 32 on the 48 layers' activations alone exceed the GPU: checkpointing is needed.
    big = plan(PlanRequest("gpt2-xl", micro_batch=32, gpu_memory_gb=80))
    assert big.activations.full > 80 * GIB and big.suggestion.activation_checkpointing


def test_suggested_checkpointing_section_is_the_shipped_one():
    from ds_trainer.config import load_run_config
    from ds_trainer.ds_config import resolve

    for name in ("zero1_activation_checkpointing", "zero3_activation_checkpointing"):
        shipped = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())["activation_checkpointing"]
        assert shipped == ACTIVATION_CHECKPOINTING_SECTION
    s = plan(PlanRequest("gpt2-xl", micro_batch=32, gpu_memory_gb=80)).suggestion
    assert s.activation_checkpointing
    run = load_run_config(None, ["--model.preset", "gpt2-xl", "--train.max_steps", "10"])
    r = resolve(s.config, "suggested", run, 1, 10_000, "cuda")
    assert r.config["activation_checkpointing"]["number_checkpoints"] == 48  # "auto": one per block
    assert s.config["activation_checkpointing"] is not ACTIVATION_CHECKPOINTING_SECTION


def test_suggestion_is_the_cheapest_that_fits():
    small = plan(PlanRequest("gpt2", micro_batch=4, gpus_per_node=8)).suggestion
    assert small.base_file == "zero0" and not small.activation_checkpointing
    assert "activation_checkpointing" not in small.config
    # 40 GB GPUs and 8 of them: gpt2-xl needs ZeRO partitioning to fit without recomputation.
    mid = plan(PlanRequest("gpt2-xl", micro_batch=8, gpus_per_node=8, gpu_memory_gb=40)).suggestion
    assert mid.layout.stage >= 1
    # The tie to the real files: the JSON is the ds_configs/ file with the planned values filled in.
    base = json.loads((REPO / "ds_configs" / f"{mid.base_file}.json").read_text())
    assert mid.config["zero_optimization"] == base["zero_optimization"]
    assert mid.config["bf16"] == {"enabled": True}
    fp32 = plan(PlanRequest("gpt2", dtype="fp32")).suggestion.config
    assert "bf16" not in fp32 and "fp16" not in fp32
    fp16 = plan(PlanRequest("gpt2", dtype="fp16")).suggestion.config
    assert fp16["fp16"]["enabled"] is True and "bf16" not in fp16
    for cfg in (mid.config, fp32):
        _resolves(cfg)


def test_offload_is_suggested_when_states_outgrow_the_gpus():
    # 6.7B parameters on one 80 GB GPU: 20 bytes per parameter cannot stay on the GPU.
    cfg = GPTConfig(n_layer=32, n_head=32, n_embd=4096, block_size=2048)
    p = plan(PlanRequest(cfg, micro_batch=1, gpu_memory_gb=80))
    assert p.suggestion is not None
    assert p.suggestion.layout.offload_optimizer != "none"
    assert p.suggestion.need.states.cpu_per_node > 0


def test_a_model_that_fits_nowhere_is_reported_not_raised():
    cfg = GPTConfig(n_layer=128, n_head=160, n_embd=25600)  # ~1T parameters on one GPU
    p = plan(PlanRequest(cfg, micro_batch=1))
    assert p.suggestion is None
    assert "no DeepSpeed config fits" in p.no_fit_reason
    assert "NVMe" in p.no_fit_reason
    assert "no DeepSpeed config fits" in format_plan(p)
    tiny_gpu = plan(PlanRequest("gpt2-xl", micro_batch=1, gpu_memory_gb=1.5))
    assert tiny_gpu.suggestion is None and "GPU needs" in tiny_gpu.no_fit_reason


def test_requested_layout_is_reported_both_ways():
    p = plan(PlanRequest("gpt2", zero=3, offload="cpu", gpus_per_node=4))
    assert p.layout == Layout(3, "cpu", "cpu")
    assert p.need_checkpointed.gpu < p.need.gpu
    assert p.deepspeed is not None and p.deepspeed.function == "estimate_zero3_model_states_mem_needs"
    assert plan(PlanRequest("gpt2", zero=3, offload="cpu", offload_params=False)).layout == Layout(
        3, "cpu", "none"
    )
    assert plan(PlanRequest("gpt2", zero=1)).deepspeed is None
    text = format_plan(p)
    assert "DeepSpeed estimator" in text and "ZeRO paper" in text and "GiB" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"zero": 5}, "ZeRO stage"),
        ({"offload": "cpu"}, "offload needs ZeRO"),
        ({"zero": 2, "offload": "nvme"}, "NVMe offload"),
        ({"zero": 2, "offload": "cpu", "offload_params": True}, "parameter offload needs ZeRO stage 3"),
        ({"dtype": "fp8"}, "dtype"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"mfu": 1.5}, "mfu"),
        ({"context": 2048}, "block_size"),
        ({"gpus_per_node": 0}, "gpus_per_node"),
    ],
)
def test_bad_input_raises_a_user_error(kwargs, message):
    with pytest.raises(DsTrainerError, match=message):
        plan(PlanRequest("gpt2", **kwargs))


def test_model_config_errors():
    with pytest.raises(DsTrainerError, match="unknown model preset"):
        model_config("gpt5")
    with pytest.raises(DsTrainerError, match="divisible"):
        model_config(n_layer=2, n_head=5, n_embd=64)
    with pytest.raises(DsTrainerError, match="missing --n_head"):
        model_config(n_layer=2, n_embd=64)
    assert model_config("gpt2", n_layer=2).n_layer == 2


# --- launcher --------------------------------------------------------------------------------------


@functools.cache
def _launcher_main():
    """launch/plan.py's main(), imported from its file (launch/ is not a package)."""
    spec = importlib.util.spec_from_file_location("launch_plan", REPO / "launch" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "plan.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_launcher_prints_the_table():
    r = _launch("--preset", "gpt2", "--zero", "2", "--nodes", "1", "--gpus_per_node", "8")
    assert r.returncode == 0, r.stderr
    for text in (
        "124.44M parameters",
        "model states per GPU (GiB)",
        "activations per GPU",
        "fits",
        "compute",
    ):
        assert text in r.stdout
    assert "estimate_zero2_model_states_mem_needs" in r.stdout
    # The suggested JSON closes the output and parses.
    start = r.stdout.index("\n{") + 1
    assert json.loads(r.stdout[start:])["zero_optimization"]["stage"] == 0


def test_launcher_rejects_bad_input_with_one_error_line():
    r = _launch("--preset", "gpt5")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "gpt2", "--zero", "5"], "ZeRO stage"),
        (["--n_layer", "2", "--n_head", "5", "--n_embd", "64"], "divisible"),
        (["--preset", "gpt2", "--zero", "x"], "invalid int"),
        (["--preset", "gpt2", "--unknown", "1"], "unrecognized"),
    ],
)
def test_launcher_main_exit_codes(argv, message, capsys):
    assert _launcher_main()(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_launcher_writes_the_suggestion(tmp_path, capsys):
    from ds_trainer.ds_config import load_ds_json

    main = _launcher_main()
    out = tmp_path / "plan" / "ds.json"
    assert main(["--preset", "gpt2-xl", "--micro_batch", "32", "--write", str(out)]) == 0
    written, _ = load_ds_json(str(out))
    assert "activation_checkpointing" in written or written["train_micro_batch_size_per_gpu"] < 32
    _resolves(written)
    assert f"wrote {out}" in capsys.readouterr().out
    # Nothing fits: the plan is printed, but nothing is written and the exit code says so.
    bad = tmp_path / "none.json"
    assert main(["--n_layer", "128", "--n_head", "160", "--n_embd", "25600", "--write", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "no DeepSpeed config fits" in captured.out
    assert captured.err.startswith("error: no DeepSpeed config fits") and captured.err.count("\n") == 1
    assert not bad.exists()


# --- the host (issue 15: offload on a host smaller than the model's states) ------------------------------


def test_host_figures_are_the_offload_terms_for_gpt2_tiny():
    from ds_trainer.offload import Host
    from ds_trainer.planning.constants import HOST_PROCESS_BASE
    from ds_trainer.planning.host import host_needs

    p, wte = 3_324_736, 50257 * 64  # gpt2-tiny's parameters and its largest
    needs = {n.base_file: n for n in host_needs(PRESETS["gpt2-tiny"], "bf16", Host(GIB), 1)}
    assert (needs["zero3"].resident, needs["zero3"].pinned, needs["zero3"].nvme) == (HOST_PROCESS_BASE, 0, 0)
    nvme = needs["zero3_offload_nvme"]
    # The reduced bf16 gradients 2P and a sub-group's fp32 gradient buffer (all of P here, 4P), 4 swap
    # buffers of a sub-group, the parameters kept in CPU memory (2P) and 5 parameter swap buffers of the
    # embedding; on NVMe fp32 weights, moments and gradients and the 16-bit parameters. Everything is
    # pinned on a 1 GiB host.
    assert nvme.resident == HOST_PROCESS_BASE + 2 * p + 4 * p + 4 * p * 4 + 2 * p + 5 * wte * 2
    assert nvme.pinned == nvme.resident - HOST_PROCESS_BASE
    assert nvme.nvme == 18 * p
    # fp32 weights, moments and sub-group gradients (16P) and the bf16 reduced gradients (2P); the
    # bf16 parameters (2P).
    cpu = needs["zero3_offload_cpu"]
    assert (cpu.resident, cpu.pinned, cpu.nvme) == (HOST_PROCESS_BASE + 20 * p, 20 * p, 0)
    assert needs["zero2_offload_cpu"].resident == HOST_PROCESS_BASE + 18 * p  # with the 16-bit staging copy
    assert all(n.fits for n in needs.values())


def test_two_ranks_per_node_double_the_node_figures():
    from ds_trainer.offload import Host
    from ds_trainer.planning.host import host_needs

    one = {n.base_file: n for n in host_needs(PRESETS["gpt2"], "bf16", Host(GIB * 64), 1)}
    two = {n.base_file: n for n in host_needs(PRESETS["gpt2"], "bf16", Host(GIB * 64, ranks=2), 2)}
    # Each rank holds half the states (its partition) plus its own process: the node holds one more process.
    cpu1, cpu2 = one["zero3_offload_cpu"], two["zero3_offload_cpu"]
    assert cpu2.resident - cpu1.resident == pytest.approx(GIB // 2, abs=64)


def test_launcher_compares_the_layouts_on_a_host(tmp_path):
    r = _launch("--preset", "gpt2-xl", "--micro_batch", "1", "--context", "128", "--host_memory", "24GB",
                "--nvme_path", str(tmp_path), "--cpu_ranks")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("  zero")}
    assert set(rows) == {
        "zero3.json",
        "zero2_offload_cpu.json",
        "zero3_offload_cpu.json",
        "zero3_offload_nvme.json",
    }
    # gpt2-xl's fp32 states (25 GB) do not fit a 24 GiB host; NVMe offload does where the disk has room.
    assert "does NOT fit (needs" in rows["zero3_offload_cpu.json"]
    suggestion = r.stdout.splitlines()[-1]
    disk_room = "fits" in rows["zero3_offload_nvme.json"]
    assert suggestion.startswith(
        "host suggestion  zero3_offload_nvme.json" if disk_room else "host suggestion  none"
    )
    if disk_room:
        assert "offload_param.buffer_size=80411200" in suggestion and "sub_group_size=100663296" in suggestion


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "gpt2", "--host_memory", "24XB"], "--host_memory='24XB' is not a memory size"),
        (["--preset", "gpt2", "--host_memory", "0GB"], "is not a memory size"),
        (["--preset", "gpt2", "--nvme_path", "/tmp"], "give --host_memory too"),
    ],
)
def test_launcher_refuses_a_bad_host(argv, message, capsys):
    assert _launcher_main()(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
