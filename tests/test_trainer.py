"""The loop through real DeepSpeed engines: ZeRO variants under the launcher, accumulation, schedule, clipping."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    fp32,
    losses,
    ok,
    read_metrics,
    requires_libaio,
    run_pretrain,
    samples,
    tiny_args,
    val_losses,
)

STEPS = 20


def final_weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    """Module weights of the checkpoint at `step`, from DeepSpeed's model-states file (ZeRO 0-2)."""
    states = torch.load(run_dir / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


# Evaluation and a sample at the last step: under ZeRO-3 both run on partitioned parameters.
VARIANT = {"train.peak_lr": 3e-3, "eval.interval": STEPS, "eval.iters": 2, "eval.sample_tokens": 4}


@pytest.fixture(scope="module")
def zero0_two_ranks(tmp_path_factory, verdict_path):
    d = tmp_path_factory.mktemp("zero0")
    ds = fp32(d / "ds.json", "zero0")
    proc = run_pretrain(
        ["--ds_config", str(ds), *tiny_args(d / "run", verdict_path, STEPS, **VARIANT)], ranks=2
    )
    ok(proc)
    return losses(d / "run"), val_losses(d / "run"), samples(d / "run")


@pytest.mark.slow
@pytest.mark.parametrize(
    "base", ["zero0", "zero1", "zero2", "zero3", "zero2_offload_cpu", "zero3_offload_nvme"]
)
def test_zero_variants_match_zero0_on_two_ranks(base, tmp_path, verdict_path, zero0_two_ranks):
    if "nvme" in base:
        requires_libaio()
        extra = {
            "zero_optimization": {
                **json.loads((REPO / "ds_configs" / f"{base}.json").read_text())["zero_optimization"]
            }
        }
        for section in ("offload_optimizer", "offload_param"):
            extra["zero_optimization"][section]["nvme_path"] = str(tmp_path / "nvme")
        ds = fp32(tmp_path / "ds.json", base, **extra)
    else:
        ds = fp32(tmp_path / "ds.json", base)
    proc = run_pretrain(
        ["--ds_config", str(ds), *tiny_args(tmp_path / "run", verdict_path, STEPS, **VARIANT)], ranks=2
    )
    ok(proc)
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))
    values = np.array([got[s] for s in range(1, STEPS + 1)])
    assert np.isfinite(values).all()
    assert values[-5:].mean() < values[:5].mean() - 0.3, values
    ref_losses, ref_val, ref_samples = zero0_two_ranks
    ref = np.array([ref_losses[s] for s in range(1, STEPS + 1)])
    np.testing.assert_allclose(values, ref, atol=1e-3, rtol=0)
    got_val = val_losses(tmp_path / "run")
    assert sorted(got_val) == sorted(ref_val) == [STEPS]
    np.testing.assert_allclose(got_val[STEPS], ref_val[STEPS], atol=1e-3, rtol=0)
    # Sampling draws from seed + step on every rank, so partitioned weights must give the same text.
    assert samples(tmp_path / "run") == ref_samples and len(ref_samples[STEPS]) > len("The meaning of")
    # Only rank 0 prints and writes logs: one console line per step, one TensorBoard event file.
    assert proc.stdout.count(f"sample step {STEPS}") == 1, proc.stdout[-2000:]
    assert [proc.stdout.count(f"step {s}/{STEPS} |") for s in (1, STEPS)] == [1, 1], proc.stdout[-2000:]
    assert len(list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))) == 1


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
def test_accumulation_matches_larger_micro_batch(tmp_path, verdict_path):
    runs = {}
    for name, micro, gas in (("m4g1", 4, 1), ("m2g2", 2, 2)):
        d = tmp_path / name
        args = tiny_args(
            d, verdict_path, 8, **{"train.micro_batch_size": micro, "train.gradient_accumulation_steps": gas}
        )
        ok(run_pretrain(["--ds_config", str(fp32(tmp_path / "ds.json", "zero0")), *args], ranks=0))
        runs[name] = (losses(d), final_weights(d, 8))
    (l1, w1), (l2, w2) = runs["m4g1"], runs["m2g2"]
    np.testing.assert_allclose([l2[s] for s in sorted(l2)], [l1[s] for s in sorted(l1)], atol=1e-4, rtol=0)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=0)


def ds_formula_lr(k: int, lr: float, total: int, warmup: int, warmup_min: float, cos_min: float) -> float:
    """WarmupCosineLR with linear warm-up at iteration k, written from its documented definition."""
    warmup = max(2, warmup)
    if k < warmup:
        return lr * (warmup_min + (1 - warmup_min) * k / warmup)
    progress = min(1.0, (k - warmup + 1) / max(1, total - warmup))
    return lr * max(0.0, cos_min + (1 - cos_min) * (1 + math.cos(math.pi * progress)) / 2)


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
def test_lr_follows_seed_style_schedule(tmp_path, verdict_path):
    initial, peak, min_lr, warmup, total = 1e-4, 1e-3, 1e-5, 4, 12
    args = tiny_args(
        tmp_path / "run",
        verdict_path,
        total,
        **{
            "train.initial_lr": initial,
            "train.peak_lr": peak,
            "train.min_lr": min_lr,
            "train.warmup_steps": warmup,
        },
    )
    ok(run_pretrain(["--ds_config", str(fp32(tmp_path / "ds.json", "zero0")), *args], ranks=0))
    want = []
    for k in range(total):
        if k < warmup:
            want.append(initial + (peak - initial) * k / warmup)
        else:
            progress = min(1.0, (k - warmup + 1) / (total - warmup))
            want.append(min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
    np.testing.assert_allclose(logged_lrs(tmp_path / "run"), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("stage", [0, 2])
def test_clipping_applies_clipped_update_and_logs_raw_norm(stage, process_group, verdict_path):
    from ds_trainer.checkpoint import Checkpointer, Progress
    from ds_trainer.config import load_run_config
    from ds_trainer.data import GlobalBatchSampler, SampleStream, build_datasets
    from ds_trainer.ds_config import resolve
    from ds_trainer.engine import build_engine
    from ds_trainer.guard import GuardSettings, IncidentLog, LossGuard
    from ds_trainer.metrics import Metrics
    from ds_trainer.model import GPT
    from ds_trainer.preemption import StopRequest
    from ds_trainer.trainer import LoopSettings, Trainer
    from ds_trainer.watchdog import Watchdog

    run = load_run_config(
        None, ["--data.context_length", "32", "--train.micro_batch_size", "2", "--train.max_steps", "1"]
    )
    train, _, _ = build_datasets({str(verdict_path): 1.0}, 32, 32, 0.1, 50257)
    lr = 0.5
    raw = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
        "optimizer": {"type": "SGD", "params": {"lr": lr}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    ds = resolve(raw, "test", run, 1, sum(train.sizes()), "cpu")
    torch.manual_seed(0)
    model = GPT(run.gpt_config())
    reference = GPT(run.gpt_config())
    reference.load_state_dict(model.state_dict())
    before = {k: v.detach().clone() for k, v in reference.named_parameters()}
    engine = build_engine(model, ds)
    sampler = GlobalBatchSampler(SampleStream(train.sizes(), None, seed=0), 2, 0, 1)
    settings = LoopSettings(1, 1, 0, 1, 0, 0, "", 0, 1.0, 0)
    trainer = Trainer(
        engine,
        ds,
        train,
        None,
        sampler,
        Progress(),
        Checkpointer(None, 0, 1, {}, {}),
        Metrics([], console=False),
        settings,
        StopRequest(None, 1.0, 1),
        Watchdog(0),
        LossGuard(GuardSettings(0.0, 1, 0, 1.0, 0), 1),
        IncidentLog(None),
    )
    batch_indices = GlobalBatchSampler(SampleStream(train.sizes(), None, seed=0), 2, 0, 1).next_step(1)[0]
    _, grad_norm, withheld = trainer.train_step(2, want_grad_norm=True)
    assert withheld is None

    x, y = train.batch(batch_indices)
    reference(x, y).backward()
    raw_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
    assert grad_norm == pytest.approx(float(raw_norm), rel=1e-4)
    assert grad_norm > 1.0, "the test needs a gradient that clipping changes"
    after = dict(engine.module.named_parameters())
    for name, p in reference.named_parameters():
        expected = before[name] - lr * p.grad
        torch.testing.assert_close(after[name].detach(), expected, atol=1e-6, rtol=1e-5, msg=name)


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
    args = tiny_args(run, verdict_path, 6, **{"eval.interval": 3, "eval.iters": 2, "eval.sample_tokens": 8})
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
        "perf/tokens_per_sec",
        "perf/step_ms",
        "mem/host_rss_gb",
    }
    assert want <= tags, want - tags
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    for step, value in losses(run).items():
        assert tb_loss[step] == pytest.approx(value, rel=1e-6)
    assert [e.value for e in acc.Scalars("train/tokens_seen")] == [s * 2 * 32 for s in range(1, 7)]
    for val, ppl in zip(acc.Scalars("val/loss"), acc.Scalars("val/perplexity"), strict=True):
        assert ppl.value == pytest.approx(math.exp(val.value), rel=1e-5)
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
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
        r"[\d,]+ tok/s \| eta \d+m\d\ds$",
        proc.stdout,
        re.M,
    )
    assert [int(step) for step in console] == [1, 2, 3, 4, 5, 6], proc.stdout[-3000:]
    samples = acc.Tensors("samples/text/text_summary")
    assert [s.step for s in samples] == [3, 6]
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
    from conftest import DATA

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
    assert batches[0] == 2 and batches[-1] == 8 and batches == sorted(batches)
    assert consumed[-2] < 6 * 8 <= consumed[-1]  # ends once 6 full batches of samples are seen
    assert [m["train/tokens_seen"] for m in metrics] == [int(c) * 32 for c in consumed[1:]]
    for m, seen in zip(metrics, consumed[:-1], strict=True):
        k = seen / 8
        assert m["train/lr"] == pytest.approx(ds_formula_lr(k, 1e-3, 6, 2, 0.0, 0.1), rel=1e-9, abs=1e-12)

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
    from conftest import DATA

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
    assert [math.isfinite(m["val/loss"]) for m in read_metrics(tmp_path / "run") if "val/loss" in m] == [True]

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
