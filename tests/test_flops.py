"""FLOPs per token against a hand count, the peak table, the CPU probe and the MFU arithmetic."""

from __future__ import annotations

import pytest

from ds_trainer.flops import (
    Utilisation,
    cpu_peak_tflops,
    device_peak_tflops,
    flops_per_token,
    gpu_peak_tflops,
    matmul_weights,
    run_utilisation,
)
from ds_trainer.model import GPTConfig


@pytest.mark.parametrize(
    ("preset", "context", "tied"),
    [("gpt2-tiny", 128, True), ("gpt2", 1024, True), ("gpt2", 256, False)],
    ids=["tiny", "gpt2-124m", "gpt2-book-untied"],
)
def test_flops_per_token_is_palms_count_by_hand(preset, context, tied):
    cfg = GPTConfig.from_preset(preset, tie_embeddings=tied)
    L, d, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size  # noqa: N806 - the paper's names
    # Per block: q, k, v (3·d²), the attention's projection (d²), the MLP's d→4d and 4d→d (8·d²); and the
    # head (V·d), which multiplies whether or not it shares its weight with the token embedding.
    weights = L * (3 * d * d + d * d + 8 * d * d) + V * d
    assert matmul_weights(cfg) == weights
    assert flops_per_token(cfg, context) == 6 * weights + 12 * L * context * d
    if preset == "gpt2" and context == 1024:
        assert flops_per_token(cfg, context) == pytest.approx(6 * 123.5e6 + 12 * 12 * 1024 * 768, rel=0.01)


def test_gpu_peaks_come_from_the_table_by_name():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.0
    assert gpu_peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert gpu_peak_tflops("NVIDIA A10", "bf16") == 125.0
    assert gpu_peak_tflops("NVIDIA A10G", "bf16") is None  # not "A10": unknown, so no MFU
    assert device_peak_tflops("bf16", 123.0) == (123.0, "log.peak_tflops")


def test_the_cpu_probe_measures_a_plausible_rate():
    peak = cpu_peak_tflops("fp32")
    assert 1e-4 < peak < 20  # 0.1 GFLOP/s to 20 TFLOP/s: any CPU this runs on


def test_mfu_is_tokens_per_second_times_flops_over_devices_and_peak():
    u = Utilisation(flops_per_token=2e9, devices=4, peak_tflops=100.0)
    assert u.tflops_per_device(50_000) == pytest.approx(25.0)  # 50k tok/s x 2 GFLOP / 4 devices
    assert u.mfu(50_000) == pytest.approx(0.25)
    assert Utilisation(2e9, 4, None).mfu(50_000) is None
    cfg = GPTConfig.from_preset("gpt2-tiny")
    u, line = run_utilisation(cfg, 64, 2, "fp32", 0.5, measure=True)
    assert (u.devices, u.peak_tflops, u.flops_per_token) == (2, 0.5, flops_per_token(cfg, 64))
    assert line.endswith("MFU against 0.5 TFLOP/s per device (log.peak_tflops)")
    u, line = run_utilisation(cfg, 64, 2, "fp32", None, measure=False)  # a rank that does not log
    assert u.peak_tflops is None and "no MFU" in line


def test_a_peak_that_is_not_positive_is_refused():
    from ds_trainer.config import ConfigError, load_run_config

    with pytest.raises(ConfigError, match="log.peak_tflops must be > 0, got 0.0"):
        load_run_config(None, ["--log.peak_tflops", "0"])
