"""The loop through real DeepSpeed engines: ZeRO variants under the launcher, accumulation, schedule, clipping."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ADAMW_LR,
    REPO,
    SGD_LR,
    assert_same_training,
    books_lr,
    ds_formula_lr,
    final_weights,
    fp32,
    losses,
    ok,
    read_metrics,
    requires_libaio,
    run_pretrain,
    samples,
    sgd,
    tiny_args,
    val_losses,
)

STEPS = 20

# Evaluation and a sample at the last step: under ZeRO-3 both run on partitioned parameters.
VARIANT = {"eval.interval": STEPS, "eval.iters": 2, "eval.sample_tokens": 4}


def single_batch_run(folder: Path, verdict_path: Path, ds: Path, lr: float) -> Path:
    """One rank reading each step's global batch of 4 as one micro-batch, ZeRO-0. The global sample order
    does not depend on ranks, so 2 ranks x micro 2 read the same windows: their mean gradient is this one."""
    args = tiny_args(
        folder / "run", verdict_path, STEPS, **VARIANT, **{"train.micro_batch_size": 4, "train.peak_lr": lr}
    )
    ok(run_pretrain(["--ds_config", str(ds), *args], ranks=0))
    return folder / "run"


@pytest.fixture(scope="module")
def sgd_reference(tmp_path_factory, verdict_path) -> Path:
    d = tmp_path_factory.mktemp("sgd_reference")
    run = single_batch_run(d, verdict_path, sgd(d / "ds.json", "zero0"), SGD_LR)
    values = [losses(run)[s] for s in range(1, STEPS + 1)]
    assert values[-1] < values[0] - 2.0, values  # a rate at which the gradient's scale matters
    return run


@pytest.fixture(scope="module")
def adamw_reference(tmp_path_factory, verdict_path) -> Path:
    d = tmp_path_factory.mktemp("adamw_reference")
    return single_batch_run(d, verdict_path, fp32(d / "ds.json", "zero0"), ADAMW_LR)


# Where only the reduction order differs. AdamW's first updates are about lr x sign(gradient), so a weight
# whose gradient is at rounding level moves by up to lr a step in a direction the rounding picks (rows of
# tokens the batches barely touch): measured here 8.6e-6 on losses, 4.9e-6 on norms, 4.1e-4 on weights.
# A doubled or halved gradient moves its norm by 100%.
TOLERANCES = {
    "sgd": {"loss_atol": 1e-5, "norm_rtol": 1e-5, "weight_atol": 1e-5},
    "adamw": {"loss_atol": 5e-5, "norm_rtol": 1e-4, "weight_atol": ADAMW_LR},
}

# Each JSON on 2 ranks against the single-batch run: with SGD (ZeRO-0 included, so a doubled gradient of
# plain data parallelism is caught too); the offload paths with AdamW as shipped, since only they run
# DeepSpeed's CPU Adam, and there the pre-clipping gradient norm of every step carries the scale.
EQUALITY = [
    ("zero0", "sgd"),
    ("zero1", "sgd"),
    ("zero2", "sgd"),
    ("zero3", "sgd"),
    ("zero2_offload_cpu", "adamw"),
    ("zero3_offload_cpu", "adamw"),
    ("zero3_offload_nvme", "adamw"),
]


@pytest.mark.slow
@pytest.mark.parametrize("base, optimizer", EQUALITY)
def test_zero_variants_on_two_ranks_match_one_rank(base, optimizer, request, tmp_path, verdict_path):
    changes = {}
    if "nvme" in base:
        requires_libaio()
        zero = json.loads((REPO / "ds_configs" / f"{base}.json").read_text())["zero_optimization"]
        for section in ("offload_optimizer", "offload_param"):
            zero[section]["nvme_path"] = str(tmp_path / "nvme")
        changes["zero_optimization"] = zero
    if optimizer == "sgd":
        ds, lr = sgd(tmp_path / "ds.json", base, **changes), SGD_LR
    else:
        ds, lr = fp32(tmp_path / "ds.json", base, **changes), ADAMW_LR
    ref = request.getfixturevalue(f"{optimizer}_reference")
    run = tmp_path / "run"
    args = tiny_args(run, verdict_path, STEPS, **VARIANT, **{"train.peak_lr": lr})
    proc = run_pretrain(["--ds_config", str(ds), *args], ranks=2)
    ok(proc)
    assert "on 2 rank(s)" in proc.stdout and "global batch 4 = 2 x 1 x 2" in proc.stdout, proc.stdout[-2000:]
    values = np.array([losses(run)[s] for s in range(1, STEPS + 1)])
    assert np.isfinite(values).all()
    assert values[-5:].mean() < values[:5].mean() - 0.3, values
    tol = dict(TOLERANCES[optimizer])
    if "nvme" in base:
        # DeepSpeed's zero_to_fp32 cannot read this checkpoint: the fp32 partitions swapped to NVMe are
        # saved as raw files in offloaded_tensors/ ("consumed 3324736 numels out of 98304"). The final
        # weights still show in the validation loss and the sample below.
        tol["weight_atol"] = None
    assert_same_training(run, ref, STEPS, **tol)
    got_val, ref_val = val_losses(run), val_losses(ref)
    assert sorted(got_val) == sorted(ref_val) == [1, STEPS]  # after the first update, and the last step
    np.testing.assert_allclose(got_val[STEPS], ref_val[STEPS], atol=tol["loss_atol"], rtol=0)
    # Sampling draws from seed + step on every rank, so partitioned weights must give the same text.
    assert samples(run) == samples(ref) and len(samples(ref)[STEPS]) > len("The meaning of")
    # Only rank 0 prints and writes logs: one console line per step, one TensorBoard event file.
    assert proc.stdout.count(f"sample step {STEPS}") == 1, proc.stdout[-2000:]
    assert [proc.stdout.count(f"step {s}/{STEPS} |") for s in (1, STEPS)] == [1, 1], proc.stdout[-2000:]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "zero3_offload_cpu"])
def test_shipped_bf16_json_runs_under_the_launcher(name, tmp_path, verdict_path):
    """The README's command with the JSON as shipped (bf16, parameters offloaded to CPU in the second)."""
    args = tiny_args(
        tmp_path / "run", verdict_path, 3, **{"data.context_length": 16, "checkpoint.save_interval": 2}
    )
    proc = run_pretrain(["--ds_config", f"ds_configs/{name}.json", *args], ranks=2)
    ok(proc)
    got = losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3] and all(5 < v < 12 for v in got.values()), got
    # A checkpoint every save interval and one at the end.
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == ["step_00000002", "step_00000003"]
    assert "ZeRO-3 bf16 on 2 rank(s)" in proc.stdout
    assert proc.stdout.count("step 3/3 |") == 1, proc.stdout[-2000:]


@pytest.mark.slow
def test_accumulation_matches_one_micro_batch(tmp_path, verdict_path, sgd_reference):
    """Micro 2 x accumulation 2 on one rank reads the windows of the reference's micro 4 x 1. Under SGD a
    gradient not divided by the accumulation (or divided twice) changes every loss after the first, and
    the gradient norm and weights."""
    run = tmp_path / "run"
    extra = {"train.peak_lr": SGD_LR, "train.gradient_accumulation_steps": 2}
    args = tiny_args(run, verdict_path, STEPS, **extra)  # no evaluation: it would read other windows
    proc = run_pretrain(["--ds_config", str(sgd(tmp_path / "ds.json", "zero0")), *args], ranks=0)
    ok(proc)
    assert "global batch 4 = 2 x 2 x 1" in proc.stdout, proc.stdout[-2000:]
    assert_same_training(run, sgd_reference, STEPS)


def logged_lrs(run_dir) -> list[float]:
    return [m["train/lr"] for m in read_metrics(run_dir) if "train/lr" in m]


@pytest.mark.slow
def test_lr_follows_json_warmup_cosine(tmp_path, verdict_path):
    sched = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": 12,
            "warmup_num_steps": 4,
            "warmup_min_ratio": 0.1,
            "cos_min_ratio": 0.2,
            "warmup_type": "linear",
        },
    }
    opt = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}
    ds = fp32(tmp_path / "ds.json", "zero0", scheduler=sched, optimizer=opt)
    ok(run_pretrain(["--ds_config", str(ds), *tiny_args(tmp_path / "run", verdict_path, 12)], ranks=0))
    want = [ds_formula_lr(k, 1e-3, 12, 4, 0.1, 0.2) for k in range(12)]
    np.testing.assert_allclose(logged_lrs(tmp_path / "run"), want, rtol=1e-9, atol=1e-12)
    assert logged_lrs(tmp_path / "run")[0] == pytest.approx(
        1e-4
    )  # step 1 trains at warmup_min_ratio x lr, not 0


@pytest.mark.slow
def test_lr_follows_seed_style_schedule_also_after_a_resume(tmp_path, verdict_path):
    initial, peak, min_lr, warmup, total = 1e-4, 1e-3, 1e-5, 4, 12
    run = tmp_path / "run"
    lr_keys = {
        "train.initial_lr": initial,
        "train.peak_lr": peak,
        "train.min_lr": min_lr,
        "train.warmup_steps": warmup,
    }
    args = tiny_args(run, verdict_path, total, **lr_keys, **{"checkpoint.save_interval": 6})
    cmd = ["--ds_config", str(fp32(tmp_path / "ds.json", "zero0")), *args]
    ok(run_pretrain(cmd, ranks=0))
    want = [books_lr(k, initial, peak, min_lr, warmup, total) for k in range(total)]
    np.testing.assert_allclose(logged_lrs(run), want, rtol=1e-9, atol=1e-12)
    assert want[warmup] == peak and want[-1] > min_lr  # the books' cosine starts at the peak
    saved = json.loads((run / "step_00000012" / "ds_config.json").read_text())["scheduler"]
    assert saved["cosine_from"] == "warmup_end"  # the resolved JSON says which count ran

    # Resumed mid-cosine (from step 6): steps 7..12 keep the formula.
    shutil.rmtree(run / "step_00000012")
    written = len(read_metrics(run))
    ok(run_pretrain(cmd, ranks=0))
    resumed = [m["train/lr"] for m in read_metrics(run)[written:] if "train/lr" in m]
    np.testing.assert_allclose(resumed, want[6:], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_bf16_run_trains(tmp_path, verdict_path):
    args = tiny_args(tmp_path / "run", verdict_path, 4, **{"data.context_length": 16})
    proc = run_pretrain(["--ds_config", "ds_configs/zero1.json", *args], ranks=0)
    ok(proc)
    got = losses(tmp_path / "run")
    assert len(got) == 4 and all(math.isfinite(v) and 5 < v < 12 for v in got.values()), got
    assert "ZeRO-1 bf16 on 1 rank(s)" in proc.stdout
    # The engine really ran in bf16: DeepSpeed saves the module's working weights in their dtype.
    assert {t.dtype for t in final_weights(tmp_path / "run", 4).values()} == {torch.bfloat16}


@pytest.mark.slow
def test_tensorboard_holds_every_scalar_and_the_sample(tmp_path, verdict_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    extra = {"eval.interval": 3, "eval.iters": 2, "eval.sample_tokens": 8, "log.peak_tflops": 0.002}
    args = tiny_args(run, verdict_path, 6, **extra)
    proc = run_pretrain(["--ds_config", str(fp32(tmp_path / "ds.json", "zero1")), *args], ranks=0)
    ok(proc)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_seen",
        "val/loss",
        "val/perplexity",
        "eval/train_loss",
        "train/epoch",
        "perf/tokens_per_sec",
        "perf/step_ms",
        "mem/host_rss_gb",
        "perf/mfu",
        "perf/tflops_per_device",
    }
    assert want <= tags, want - tags
    # MFU: tokens/s x FLOPs per token (counted from the model by hand: tiny, context 32) / 1 device / peak.
    per_token = 6 * (2 * 12 * 64 * 64 + 50257 * 64) + 12 * 2 * 32 * 64
    assert (
        f"{per_token:.3e} FLOPs per token; MFU against 0.002 TFLOP/s per device (log.peak_tflops)"
        in proc.stdout
    )
    # Steps on the CPU, nothing offloaded: the host keeps freed memory for the next step (ds_trainer/host_malloc.py).
    assert (
        "host malloc: keep freed memory for the next step (steps on the CPU, nothing offloaded)"
        in proc.stdout
    )
    for m in (m for m in read_metrics(run) if "perf/mfu" in m):
        assert m["perf/tflops_per_device"] == pytest.approx(
            m["perf/tokens_per_sec"] * per_token / 1e12, rel=1e-9
        )
        assert m["perf/mfu"] == pytest.approx(m["perf/tflops_per_device"] / 0.002, rel=1e-9)
    tb_mfu = [e.value for e in acc.Scalars("perf/mfu")]
    assert tb_mfu == pytest.approx([m["perf/mfu"] for m in read_metrics(run) if "perf/mfu" in m], rel=1e-6)
    assert len(tb_mfu) == 6
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    for step, value in losses(run).items():
        assert tb_loss[step] == pytest.approx(value, rel=1e-6)
    assert [e.value for e in acc.Scalars("train/tokens_seen")] == [s * 2 * 32 for s in range(1, 7)]
    for val, ppl in zip(acc.Scalars("val/loss"), acc.Scalars("val/perplexity"), strict=True):
        assert ppl.value == pytest.approx(math.exp(val.value), rel=1e-5)
    assert [e.step for e in acc.Scalars("val/loss")] == [1, 3, 6]  # after the first update, every 3, the last
    assert [e.step for e in acc.Scalars("eval/train_loss")] == [1, 3, 6]
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))
    tb_lr = [e.value for e in acc.Scalars("train/lr")]
    assert tb_lr == pytest.approx([m["train/lr"] for m in read_metrics(run) if "train/lr" in m], rel=1e-6)
    assert len(set(tb_lr)) > 1  # the schedule moves
    step_ms = [e.value for e in acc.Scalars("perf/step_ms")]
    tok_s = [e.value for e in acc.Scalars("perf/tokens_per_sec")]
    assert len(step_ms) == len(tok_s) == 6 and all(ms > 0 for ms in step_ms)
    for ms, rate in zip(step_ms, tok_s, strict=True):  # 64 tokens per step
        assert rate == pytest.approx(64 / (ms / 1000), rel=1e-3)
    assert all(0.05 < e.value < 24 for e in acc.Scalars("mem/host_rss_gb"))
    # The console line, one per log interval, from rank 0 only.
    console = re.findall(
        r"^step (\d+)/6 \| epoch 1 \| loss \d+\.\d{3} \| lr \d\.\de[-+]\d\d \| [\d,]+ ms/step \| "
        r"[\d,]+ tok/s \| MFU \d+\.\d% \| eta \d+m\d\ds$",
        proc.stdout,
        re.M,
    )
    assert [int(step) for step in console] == [1, 2, 3, 4, 5, 6], proc.stdout[-3000:]
    samples = acc.Tensors("samples/text/text_summary")
    assert [s.step for s in samples] == [1, 3, 6]
    assert samples[0].tensor_proto.string_val[0].decode().startswith("The meaning of")


@pytest.mark.slow
def test_default_run_loss_falls(tmp_path):
    """No run config at all: gpt2-tiny on the built-in corpus, at half the default 300 steps (the full
    run took 1 min 41 s here and ended at loss 6.0)."""
    run = tmp_path / "run"
    proc = run_pretrain(["--checkpoint.dir", str(run), "--train.max_steps", "150"], ranks=0, timeout=900)
    ok(proc)
    got = losses(run)
    steps = sorted(got)
    assert steps[-1] == 150
    assert got[steps[-1]] < got[steps[0]] - 2.0, got
    assert "eval step" in proc.stdout and "sample step" in proc.stdout


@pytest.mark.slow
def test_two_rank_run_resumes_on_one_rank_with_the_remaining_samples(tmp_path, verdict_path):
    """Same global batch (2 ranks × micro 2, then 1 rank × micro 2 × accumulation 2): the data position
    carries over, so the losses after the switch equal those of a run that never switched."""
    ds = str(fp32(tmp_path / "ds.json", "zero0"))
    switched = tmp_path / "switched"
    ok(
        run_pretrain(
            ["--ds_config", ds, *tiny_args(switched, verdict_path, 10, **{"checkpoint.save_interval": 5})],
            ranks=2,
        )
    )
    full = losses(switched)  # the uninterrupted 2-rank run
    shutil.rmtree(switched / "step_00000010")
    (switched / "latest").write_text("step_00000005")
    proc = run_pretrain(
        [
            "--ds_config",
            ds,
            *tiny_args(switched, verdict_path, 10, **{"train.gradient_accumulation_steps": 2}),
        ],
        ranks=0,
    )
    ok(proc)
    assert "at step 5" in proc.stdout
    resumed = dict([(m["step"], m["train/loss"]) for m in read_metrics(switched) if "train/loss" in m][-5:])
    assert sorted(resumed) == list(range(6, 11))
    np.testing.assert_allclose(
        [resumed[s] for s in range(6, 11)], [full[s] for s in range(6, 11)], rtol=0, atol=1e-5
    )


@pytest.mark.slow
def test_batch_rampup_on_a_mixture(tmp_path, verdict_path):
    """The global batch grows 2 → 8 over 24 windows; the schedule counts full-batch steps of samples seen."""
    from helpers import DATA

    mixture = f"{{{verdict_path}: 0.7, {DATA / 'tinyshakespeare.txt'}: 0.3}}"
    args = tiny_args(
        tmp_path / "run",
        None,
        6,
        **{
            "data.mixture": mixture,
            "train.micro_batch_size": 2,
            "train.gradient_accumulation_steps": 4,
            "train.rampup_start_batch": 2,
            "train.rampup_samples": 24,
            "train.warmup_steps": 2,
            "train.peak_lr": 1e-3,
            "train.min_lr": 1e-4,
            "checkpoint.save_interval": 3,
            "checkpoint.keep_last": 0,
        },
    )
    cmd = ["--ds_config", str(fp32(tmp_path / "ds.json", "zero0")), *args]
    ok(run_pretrain(cmd, ranks=0))
    metrics = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    batches = [int(m["train/global_batch"]) for m in metrics]
    consumed = np.cumsum([0, *batches])
    # README: the batch grows linearly from rampup_start_batch to the JSON's global batch over rampup_samples,
    # in whole micro-batches x ranks (2 x 1 here), and max_steps counts steps of the full batch of 8.
    want, seen = [], 0
    while seen < 6 * 8:
        line = 2 + (8 - 2) * min(seen / 24, 1.0)  # the straight line from 2 at 0 samples to 8 at 24
        want.append(max(b for b in range(2, 8 + 1, 2) if b <= line))  # in whole steps of 2, not above it
        seen += want[-1]
    assert want == [2, 2, 2, 2, 4, 4, 6, 6, 8, 8, 8]  # the rule worked out by hand
    assert batches == want
    assert [m["train/tokens_seen"] for m in metrics] == [int(c) * 32 for c in consumed[1:]]
    for m, seen in zip(metrics, consumed[:-1], strict=True):
        k = seen / 8  # the schedule counts full-batch steps of samples seen
        assert m["train/lr"] == pytest.approx(books_lr(k, 0.0, 1e-3, 1e-4, 2, 6), rel=1e-9, abs=1e-12)

    # Resumed in the middle of the ramp: the same batches, rates and losses from step 4 on.
    assert batches[2] < batches[-1]
    for later in (tmp_path / "run").glob("step_*"):
        if int(later.name.split("_")[1]) > 3:
            shutil.rmtree(later)
    (tmp_path / "run" / "latest").write_text("step_00000003")
    proc = run_pretrain(cmd, ranks=0)
    ok(proc)
    assert "at step 3" in proc.stdout
    keys = ("step", "train/loss", "train/lr", "train/global_batch", "train/tokens_seen")
    resumed = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m][len(metrics) :]
    assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in metrics[3:]]


@pytest.mark.slow
def test_trains_from_prepared_shards(tmp_path):
    from helpers import DATA

    from ds_trainer.data.prepare import prepare

    prepare(
        [str(DATA / "tinyshakespeare.txt"), str(DATA / "the-verdict.txt")],
        str(tmp_path / "ds"),
        workers=2,
        progress=False,
        shard_tokens=50_000,
        val_fraction=0.5,
        seed=1,
    )
    args = tiny_args(
        tmp_path / "run", tmp_path / "ds", 3, **{"eval.interval": 3, "eval.iters": 1, "eval.sample_tokens": 2}
    )
    ds = str(fp32(tmp_path / "ds.json", "zero0"))
    proc = run_pretrain(["--ds_config", ds, *args], ranks=0)
    ok(proc)
    assert len(losses(tmp_path / "run")) == 3 and "eval step 3" in proc.stdout
    assert [math.isfinite(m["val/loss"]) for m in read_metrics(tmp_path / "run") if "val/loss" in m] == [
        True
    ] * 2

    # One document prepared into a shard reads as the same windows as the text itself: the same losses.
    prepare(
        [str(DATA / "the-verdict.txt")],
        str(tmp_path / "verdict"),
        workers=2,
        progress=False,
        val_fraction=0.0,
    )
    got = {}
    for name, extra in (("shards", {}), ("text", {"data.val_fraction": 0.0})):
        source = tmp_path / "verdict" if name == "shards" else DATA / "the-verdict.txt"
        ok(run_pretrain(["--ds_config", ds, *tiny_args(tmp_path / name, source, 4, **extra)], ranks=0))
        got[name] = losses(tmp_path / name)
    assert len(got["text"]) == 4 and got["shards"] == got["text"]


BOOK_STEPS, BOOK_WARMUP, BOOK_CLIP_FROM, BOOK_SEED = 20, 4, 5, 123
BOOK_LR = {"initial": 1e-5, "peak": 1e-3, "min_lr": 1e-5}


def books_loop(verdict_path: Path, batch: int) -> list[float]:
    """The books' training loop, written out: torch's AdamW on every parameter, the schedule set by hand each
    step, clipping from step BOOK_CLIP_FROM (counted from 0), over the windows in ds_trainer's data order."""
    from ds_trainer.data import SampleStream, build_datasets
    from ds_trainer.model import GPT, GPTConfig

    cfg = GPTConfig.from_preset("gpt2-tiny", init="torch", dropout=0.0)
    train, _, _ = build_datasets({str(verdict_path): 1.0}, 32, 32, None, cfg.vocab_size)
    torch.manual_seed(BOOK_SEED)  # ds_trainer seeds the same way before it builds the model
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BOOK_LR["peak"], weight_decay=0.1)
    order = SampleStream(train.sizes(), None, BOOK_SEED)
    out = []
    for k in range(BOOK_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = books_lr(
                k, BOOK_LR["initial"], BOOK_LR["peak"], BOOK_LR["min_lr"], BOOK_WARMUP, BOOK_STEPS
            )
        x, y = train.batch(order.take(batch))
        optimizer.zero_grad()
        loss = model(x, y)
        loss.backward()
        if k >= BOOK_CLIP_FROM:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        out.append(loss.item())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,ranks", [(0, 1), (2, 2)])
def test_books_recipe_trains_like_the_books_loop(tmp_path, verdict_path, stage, ranks):
    ds = json.loads((REPO / "ds_configs" / "appendix_d.json").read_text())
    ds["zero_optimization"] = {"stage": stage}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    book = {
        "model.init": "torch",
        "train.seed": BOOK_SEED,
        "train.initial_lr": BOOK_LR["initial"],
        "train.peak_lr": BOOK_LR["peak"],
        "train.min_lr": BOOK_LR["min_lr"],
        "train.warmup_steps": BOOK_WARMUP,
        "train.weight_decay": 0.1,
        "train.max_norm": 1.0,
        "train.clip_from_step": BOOK_CLIP_FROM,
        "train.decay_all_parameters": True,
    }
    run = tmp_path / "run"
    ok(
        run_pretrain(
            ["--ds_config", str(tmp_path / "ds.json"), *tiny_args(run, verdict_path, BOOK_STEPS, **book)],
            ranks=ranks,
        )
    )
    got = [losses(run)[s] for s in range(1, BOOK_STEPS + 1)]
    want = books_loop(verdict_path, batch=2 * ranks)  # 2 ranks of micro-batch 2 train on 4 windows a step
    print("loss diffs vs the books' loop:", [f"{a - b:.1e}" for a, b in zip(got, want, strict=True)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
