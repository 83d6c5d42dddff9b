"""Offload sizes derived from the model and the host ("auto"), and the explicit ones that cannot work."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import losses, ok, requires_libaio, run_pretrain, tiny_args

from ds_trainer.config import load_run_config
from ds_trainer.ds_config import load_ds_json, resolve
from ds_trainer.errors import PROBLEM_SEPARATOR, DsTrainerError
from ds_trainer.offload import Host, Tensors
from ds_trainer.planning.constants import GIB

REPO = Path(__file__).resolve().parents[1]
NVME_JSON = REPO / "ds_configs" / "zero3_offload_nvme.json"
TINY = ["--model.preset", "gpt2-tiny", "--train.micro_batch_size", "1", "--data.context_length", "32"]
WTE = (
    50257 * 64
)  # gpt2-tiny's token embedding, its largest parameter and (threshold 1e5) the only one swapped
TOTAL = 3_324_736  # gpt2-tiny's parameters (test_model counts them)
QUARTER_GIB = GIB // 4


def nvme_json(folder: Path, **zero_changes) -> dict:
    raw, _ = load_ds_json(str(NVME_JSON))
    zero = raw["zero_optimization"]
    for key, value in zero_changes.items():
        section, _, name = key.rpartition(".")
        (zero[section] if section else zero)[name] = value
    for section in ("offload_optimizer", "offload_param"):
        zero[section]["nvme_path"] = str(folder)
    return raw


def resolved_zero(raw: dict, host: Host, ranks: int = 1, overrides: list[str] = TINY) -> dict:
    run = load_run_config(None, overrides)
    return resolve(raw, "ds.json", run, ranks, 1000, "cpu", host=host).config["zero_optimization"]


def problem_lines(raw: dict, host: Host, overrides: list[str] = TINY) -> list[str]:
    with pytest.raises(DsTrainerError) as e:
        resolved_zero(raw, host, overrides=overrides)
    return re.split(f"{PROBLEM_SEPARATOR}(?=ds.json: )", str(e.value))


def test_the_rules_give_these_values_for_gpt2_tiny_on_a_quarter_gib_host(tmp_path):
    requires_libaio()
    zero = resolved_zero(nvme_json(tmp_path), Host(QUARTER_GIB))
    # Optimizer: 4 pinned fp32 buffers of a sub-group, within 1/16 of the host: 2**28 / 16 / (4 x 4 bytes).
    assert zero["sub_group_size"] == 1_048_576
    assert zero["offload_optimizer"]["buffer_count"] == 4
    assert zero["offload_optimizer"]["pin_memory"] is True  # 16 MiB pinned of 256 MiB
    # Parameters: a buffer holds the largest parameter; prefetching (buffer_count - 3) of the smallest
    # swapped parameter, no reuse cache, and every parameter may stay in CPU memory (an eighth of the host
    # holds 2**25 / 2 bytes = 16.7M elements, more than the model's 3.3M).
    param = zero["offload_param"]
    assert (param["buffer_size"], param["buffer_count"]) == (WTE, 5)
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_max_reuse_distance"]) == (2 * WTE, 0)
    assert param["max_in_cpu"] == TOTAL
    assert param["pin_memory"] is True  # 5 x 3,216,448 x 2 bytes = 31 MiB of 256 MiB


def test_two_ranks_share_the_host_and_partition_the_parameters(tmp_path):
    requires_libaio()
    zero = resolved_zero(nvme_json(tmp_path), Host(QUARTER_GIB, ranks=2), ranks=2)
    assert zero["sub_group_size"] == 524_288  # half the host per rank
    assert zero["offload_param"]["buffer_size"] == math.ceil(WTE / 2)  # a rank swaps its partition
    assert zero["stage3_prefetch_bucket_size"] == 2 * WTE  # prefetching counts whole parameters


def test_a_small_host_keeps_parameters_on_nvme_and_unpinned(tmp_path):
    requires_libaio()
    gpt2 = ["--model.preset", "gpt2", "--train.micro_batch_size", "1", "--data.context_length", "32"]
    zero = resolved_zero(nvme_json(tmp_path), Host(GIB // 2), overrides=gpt2)
    assert zero["offload_param"]["max_in_cpu"] == GIB // 2 // 8 // 2  # 33.5M of 124M parameters
    assert zero["offload_param"]["pin_memory"] is False  # 5 x 38.6M x 2 bytes = 368 MiB is above half
    assert zero["sub_group_size"] == GIB // 2 // 16 // 16


def test_a_host_too_small_for_the_derived_buffers_says_so(tmp_path):
    requires_libaio()
    assert problem_lines(nvme_json(tmp_path), Host(16 * 2**20)) == [
        "ds.json: 5 parameter swap buffers of buffer_size=3216448: 31 MiB pinned, more than the 16 MiB of host "
        'memory per rank; set train.host_memory_gb to the host\'s memory, or fewer ranks per node, or "auto"'
    ]


def test_gpt2_xl_on_a_24_gib_host(tmp_path):
    """The issue's case: DeepSpeed's defaults pin 16 GB of swap buffers and overflow the parameter swapper."""
    requires_libaio()
    xl = ["--model.preset", "gpt2-xl", "--train.micro_batch_size", "1", "--data.context_length", "128"]
    zero = resolved_zero(nvme_json(tmp_path), Host(24 * GIB), overrides=xl)
    assert zero["sub_group_size"] == 24 * GIB // 16 // 16
    assert zero["offload_param"]["buffer_size"] == 50257 * 1600
    assert zero["stage3_prefetch_bucket_size"] == 2 * 1024 * 1600  # the position embedding is the smallest
    assert zero["offload_param"]["max_in_cpu"] == 1_557_611_200


@pytest.mark.parametrize("variable", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE"])  # torchrun's, DeepSpeed's launcher's
def test_the_host_is_shared_by_the_launchers_local_ranks(monkeypatch, variable):
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "4")
    host = Host.detect(24)
    assert (host.memory_bytes, host.ranks, host.share) == (24 * GIB, 4, 6 * GIB)


def test_tensors_match_the_model_as_built():
    from ds_trainer.model import GPT, GPTConfig

    cfg = GPTConfig.from_preset("gpt2-tiny")
    sizes = [p.numel() for p in GPT(cfg).parameters()]
    t = Tensors.of(cfg, ranks=3, persistence_threshold=100_000)
    assert t.largest == math.ceil(max(sizes) / 3)
    assert t.smallest_swapped == min(n for n in sizes if n >= 100_000)
    assert t.total == sum(math.ceil(n / 3) for n in sizes)


def test_explicit_values_that_cannot_work_get_one_line_each(tmp_path):
    requires_libaio()
    raw = nvme_json(
        tmp_path,
        **{
            "offload_param.buffer_size": 1000,
            "offload_param.buffer_count": 5,
            "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_param_persistence_threshold": 1000,
            "offload_optimizer.buffer_count": 2,
        },
    )
    lines = problem_lines(raw, Host(QUARTER_GIB))
    # Above 1000 elements 10 parameters are swapped (4 matrices a block, both embeddings), the smallest
    # attention's c_proj of 64 x 64: the bound of 3 + 12,208 + 244,141 is capped at all 10 of them.
    needed = 10
    assert lines == [
        "ds.json: zero_optimization.offload_optimizer.buffer_count=2 is below the 4 buffers DeepSpeed's NVMe "
        'swapper takes per sub-group (fp32 weights, two Adam moments, gradients); set it to 4 or "auto"',
        "ds.json: zero_optimization.offload_param.buffer_size=1000 is smaller than the largest parameter (the "
        f'token embedding, {WTE:,} elements on each rank); set it to {WTE} or "auto"',
        "ds.json: zero_optimization.offload_param.buffer_count=5 holds 5 parameters, but "
        "stage3_prefetch_bucket_size=50000000 and stage3_max_reuse_distance=1000000000 can keep "
        f"{needed} in flight (parameters of 4,096 elements); set buffer_count to {needed}, or both to "
        '"auto"',
    ]


def test_pinned_buffers_beyond_the_host_are_refused(tmp_path):
    requires_libaio()
    raw = nvme_json(
        tmp_path,
        **{
            "sub_group_size": 1_000_000_000,
            "offload_param.buffer_count": 40,
            "offload_param.pin_memory": True,
        },
    )
    lines = problem_lines(raw, Host(16 * 2**20))
    assert len(lines) == 3, lines
    host = "more than the 16 MiB of host memory per rank; set"
    assert lines == [
        "ds.json: 4 optimizer swap buffers of sub_group_size=1000000000 fp32 elements: 51 MiB pinned, "
        f'{host} sub_group_size lower or "auto"',  # 4 x 3.3M (the whole model) x 4 bytes
        f'ds.json: 40 parameter swap buffers of buffer_size=3216448: 245 MiB pinned, {host} buffer_count lower or "auto"',
        "ds.json: zero_optimization.offload_param.pin_memory=true pins: 247 MiB pinned, "  # + 1M kept in CPU
        f'{host} pin_memory false or "auto"',
    ]


def test_pinning_the_cpu_offloaded_states_beyond_the_host_is_refused():
    raw, _ = load_ds_json(str(REPO / "ds_configs" / "zero3_offload_cpu.json"))
    raw["zero_optimization"]["offload_optimizer"]["pin_memory"] = True
    lines = problem_lines(raw, Host(16 * 2**20))
    assert lines == [
        "ds.json: zero_optimization.offload_optimizer.pin_memory=true pins: 57 MiB pinned, more than the "
        '16 MiB of host memory per rank; set pin_memory false or "auto"'
    ]
    raw["zero_optimization"]["offload_optimizer"]["pin_memory"] = "auto"
    zero = resolved_zero(raw, Host(16 * 2**20))
    assert zero["offload_optimizer"]["pin_memory"] is False  # (16 + 2) bytes x 3.3M = 57 MiB of 16 MiB
    assert resolved_zero(raw, Host(GIB))["offload_optimizer"]["pin_memory"] is True


@pytest.mark.slow
def test_a_run_on_the_derived_values_trains_and_saves_them(tmp_path, verdict_path):
    """gpt2-tiny under a 32 MiB host budget: the optimizer's states swapped through NVMe in 26 sub-groups,
    the parameter swapper unpinned; the checkpoint's ds_config.json shows the values the rules gave."""
    requires_libaio()
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(nvme_json(tmp_path / "nvme")))
    run = tmp_path / "run"
    args = tiny_args(run, verdict_path, 8, **{"train.host_memory_gb": 1 / 32, "checkpoint.save_interval": 8})
    proc = run_pretrain(["--ds_config", str(ds), *args])
    ok(proc)
    assert (
        "host malloc: give freed blocks above 128 KiB back to the kernel (ZeRO offload: host memory is the budget)"
        in proc.stdout
    )
    values = np.array([losses(run)[s] for s in range(1, 9)])
    assert np.isfinite(values).all() and values[-2:].mean() < values[:2].mean(), values
    saved = json.loads((run / "step_00000008" / "ds_config.json").read_text())["zero_optimization"]
    assert saved["sub_group_size"] == GIB // 32 // 16 // 16 == 131_072
    assert (saved["offload_param"]["pin_memory"], saved["offload_optimizer"]["pin_memory"]) == (False, True)
    assert (saved["offload_param"]["buffer_size"], saved["stage3_prefetch_bucket_size"]) == (WTE, 2 * WTE)
