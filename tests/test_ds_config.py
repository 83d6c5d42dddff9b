"""The DeepSpeed JSON: "auto" values filled from the run config, derived steps, device and typo checks."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

from ds_trainer.config import load_run_config
from ds_trainer.ds_config import DEFAULT_DS_CONFIG, load_ds_json, resolve
from ds_trainer.errors import DsTrainerError

REPO = Path(__file__).resolve().parents[1]
DS_JSONS = sorted((REPO / "ds_configs").glob("*.json"))


def run(*overrides: str):
    return load_run_config(None, list(overrides))


def ds(**changes) -> dict:
    """The built-in JSON with top-level keys replaced (None removes a key)."""
    cfg = copy.deepcopy(DEFAULT_DS_CONFIG)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def do_resolve(raw=None, run_cfg=None, world=1, samples=1000, accelerator="cpu"):
    return resolve(
        raw if raw is not None else ds(), "test.json", run_cfg or run(), world, samples, accelerator
    )


def resolve_error(raw=None, run_cfg=None, world=1, samples=1000, accelerator="cpu") -> str:
    with pytest.raises(DsTrainerError) as e:
        do_resolve(raw, run_cfg, world, samples, accelerator)
    return str(e.value)


def autos(node, path="") -> list[str]:
    """Paths of every "auto" left in a JSON tree."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in autos(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in autos(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


# --- batch sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "world", "micro", "gas"),
    [
        ([], 1, 4, 1),
        ([], 3, 4, 1),
        (["--train.micro_batch_size", "3", "--train.gradient_accumulation_steps", "2"], 2, 3, 2),
    ],
)
def test_auto_batch_sizes(overrides, world, micro, gas):
    r = do_resolve(run_cfg=run(*overrides), world=world)
    assert (r.micro_batch_size, r.gradient_accumulation_steps, r.data_parallel_size) == (micro, gas, world)
    assert r.train_batch_size == micro * gas * world
    c = r.config
    assert c["train_micro_batch_size_per_gpu"] == micro
    assert c["gradient_accumulation_steps"] == gas
    assert c["train_batch_size"] == micro * gas * world
    assert autos(c) == []


def test_json_numbers_that_agree_with_the_run_config_are_fine():
    raw = ds(train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=2)
    r = do_resolve(raw, run("--train.micro_batch_size", "3"))
    assert (r.micro_batch_size, r.gradient_accumulation_steps) == (3, 2)


def test_json_numbers_that_disagree_with_the_run_config():
    raw = ds(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=2)
    msg = resolve_error(raw, run("--train.micro_batch_size", "4", "--train.gradient_accumulation_steps", "3"))
    assert "train_micro_batch_size_per_gpu=8 disagrees with train.micro_batch_size=4" in msg
    assert "gradient_accumulation_steps=2 disagrees with train.gradient_accumulation_steps=3" in msg


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "four"])
def test_batch_numbers_must_be_positive_integers(value):
    msg = resolve_error(ds(train_micro_batch_size_per_gpu=value))
    assert "train_micro_batch_size_per_gpu must be a positive integer" in msg


def test_train_batch_size_not_divisible_by_world_size():
    msg = resolve_error(ds(train_batch_size=10), world=3)
    assert "train_batch_size=10 is not a multiple of micro batch 1 × 3 data-parallel ranks = 3" in msg
    assert "(e.g. 9)" in msg
    msg = resolve_error(ds(train_batch_size=10, gradient_accumulation_steps=4), world=1)
    assert "train_batch_size=10 is not a multiple of accumulation 4 × 1 data-parallel ranks = 4" in msg


@pytest.mark.parametrize(
    ("tbs", "overrides", "world", "micro", "gas"),
    [
        (32, ["--train.micro_batch_size", "4"], 2, 4, 4),  # gas derived
        (24, ["--train.gradient_accumulation_steps", "3"], 2, 4, 3),  # micro derived
        (16, [], 2, 4, 2),  # default micro 4, gas derived
        (6, [], 2, 1, 3),  # 6 is no multiple of 4 x 2: micro 1
    ],
)
def test_numeric_train_batch_size_derives_the_missing_factor(tbs, overrides, world, micro, gas):
    r = do_resolve(ds(train_batch_size=tbs), run(*overrides), world=world)
    assert (r.micro_batch_size, r.gradient_accumulation_steps, r.train_batch_size) == (micro, gas, tbs)


# --- steps ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "samples", "steps"),
    [
        (["--train.max_steps", "50"], 1000, 50),
        (["--train.epochs", "2.5"], 100, 63),  # 100 // 4 = 25 steps per epoch, ceil(62.5)
        (["--train.epochs", "1"], 103, 25),  # the tail that does not fill a batch is skipped
        ([], 1000, 300),  # the default
    ],
)
def test_total_steps(overrides, samples, steps):
    r = do_resolve(run_cfg=run(*overrides), samples=samples)
    assert r.total_steps == steps
    assert r.config["scheduler"]["params"]["total_num_steps"] == steps


def test_fewer_windows_than_one_global_batch():
    msg = resolve_error(run_cfg=run("--train.micro_batch_size", "4"), world=2, samples=7)
    assert "7 windows, fewer than one global batch of 8" in msg


# --- learning rate and schedule ---------------------------------------------------------------------------


def test_auto_lr_is_peak_lr():
    assert do_resolve(run_cfg=run("--train.peak_lr", "0.001")).config["optimizer"]["params"]["lr"] == 0.001
    assert do_resolve().config["optimizer"]["params"]["lr"] == 6e-4


def test_json_lr_that_disagrees_with_peak_lr():
    raw = ds()
    raw["optimizer"]["params"]["lr"] = 0.01
    msg = resolve_error(raw, run("--train.peak_lr", "0.002"))
    assert "optimizer.params.lr=0.01 disagrees with train.peak_lr=0.002" in msg


def test_json_schedule_length_that_disagrees_with_the_run():
    raw = ds()
    raw["scheduler"]["params"]["total_num_steps"] = 12
    msg = resolve_error(raw, run("--train.max_steps", "20"))
    assert (
        'scheduler.params.total_num_steps=12 disagrees with the run\'s 20 steps (train.max_steps=20); set it to "auto" or 20'
        in msg
    )
    assert "disagrees with the run's 300 steps (the default length)" in resolve_error(raw)
    raw["scheduler"]["params"]["total_num_steps"] = 20
    assert (
        do_resolve(raw, run("--train.max_steps", "20")).config["scheduler"]["params"]["total_num_steps"] == 20
    )


def test_default_schedule():
    p = do_resolve(run_cfg=run("--train.max_steps", "100")).config["scheduler"]["params"]
    assert p["warmup_num_steps"] == 10  # 10% of the steps
    assert p["warmup_min_ratio"] == 0.0
    assert p["cos_min_ratio"] == pytest.approx(0.1)  # min_lr defaults to peak_lr / 10


def test_seed_style_schedule_mapping():
    r = do_resolve(
        run_cfg=run(
            "--train.initial_lr=0.0001",
            "--train.peak_lr=0.001",
            "--train.min_lr=0.00001",
            "--train.warmup_steps=7",
            "--train.max_steps=40",
        )
    )
    assert r.config["optimizer"]["params"]["lr"] == pytest.approx(1e-3)
    sched = r.config["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    assert sched["params"] == {
        "total_num_steps": 40,
        "warmup_num_steps": 7,
        "warmup_min_ratio": pytest.approx(0.1),
        "cos_min_ratio": pytest.approx(0.01),
        "warmup_type": "linear",
    }


def test_json_schedule_values_that_disagree_with_seed_style_settings():
    sched = {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": "auto",
            "warmup_num_steps": 5,
            "warmup_min_ratio": 0.5,
            "cos_min_ratio": 0.2,
        },
    }
    msg = resolve_error(
        ds(scheduler=sched),
        run(
            "--train.peak_lr=0.001",
            "--train.initial_lr=0.0001",
            "--train.min_lr=0.00001",
            "--train.warmup_steps=7",
        ),
    )
    assert "scheduler.params.warmup_num_steps=5 disagrees with train.warmup_steps=7" in msg
    assert "scheduler.params.warmup_min_ratio=0.5 disagrees with train.initial_lr=0.0001" in msg
    assert "scheduler.params.cos_min_ratio=0.2 disagrees with train.min_lr=1e-05" in msg


@pytest.mark.parametrize("where", ["run", "json"])
def test_warmup_of_one_step_is_refused(where):
    """DeepSpeed's WarmupCosineLR would warm up over 2 steps instead, off the seed formula."""
    if where == "run":
        msg = resolve_error(run_cfg=run("--train.warmup_steps", "1"))
        assert "train.warmup_steps=1, but DeepSpeed's WarmupCosineLR warms up over at least 2 steps" in msg
    else:
        sched = copy.deepcopy(DEFAULT_DS_CONFIG["scheduler"])
        sched["params"]["warmup_num_steps"] = 1
        msg = resolve_error(ds(scheduler=sched))
        assert "scheduler.params.warmup_num_steps=1, but DeepSpeed's WarmupCosineLR warms up over" in msg
    assert (
        do_resolve(run_cfg=run("--train.warmup_steps", "2")).config["scheduler"]["params"]["warmup_num_steps"]
        == 2
    )


def test_every_problem_of_the_json_is_reported_at_once():
    """Ranks that do not divide into the stages, a bad micro batch and fp16 on CPU: one message, all three."""
    raw = ds(train_micro_batch_size_per_gpu=0, fp16={"enabled": True})
    msg = resolve_error(raw, run("--pipeline.stages", "2"), world=3)
    assert "3 ranks cannot be cut into pipeline.stages=2" in msg
    assert "train_micro_batch_size_per_gpu must be a positive integer" in msg
    assert "fp16.enabled=true, but DeepSpeed does not support fp16 on the CPU accelerator" in msg


def test_seed_style_adds_a_scheduler_when_the_json_has_none():
    r = do_resolve(ds(scheduler=None), run("--train.warmup_steps", "5", "--train.max_steps", "20"))
    assert r.config["scheduler"]["type"] == "WarmupCosineLR"
    assert r.config["scheduler"]["params"]["warmup_num_steps"] == 5
    assert "scheduler" not in do_resolve(ds(scheduler=None)).config


def test_seed_style_needs_warmup_cosine():
    raw = ds(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}})
    msg = resolve_error(raw, run("--train.min_lr", "0.00001"))
    assert "map onto WarmupCosineLR" in msg and "'WarmupLR'" in msg


# --- device checks ----------------------------------------------------------------------------------------


def test_fp16_on_cpu():
    msg = resolve_error(ds(fp16={"enabled": True}), accelerator="cpu")
    assert "fp16" in msg and "CPU" in msg
    assert do_resolve(ds(fp16={"enabled": True}), accelerator="cuda").fp16


def test_fp16_and_bf16_together():
    msg = resolve_error(ds(fp16={"enabled": True}, bf16={"enabled": True}), accelerator="cuda")
    assert "fp16.enabled and bf16.enabled are both true" in msg


def nvme_offload(path) -> dict:
    return {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(path)}}


def test_nvme_path_not_writable(tmp_path):
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "sub"
    msg = resolve_error(ds(zero_optimization=nvme_offload(bad)), accelerator="cuda")
    assert f"zero_optimization.offload_param.nvme_path={bad} is not writable" in msg


def test_nvme_path_required():
    raw = ds(zero_optimization={"stage": 3, "offload_optimizer": {"device": "nvme"}})
    assert "zero_optimization.offload_optimizer.nvme_path is required" in resolve_error(
        raw, accelerator="cuda"
    )


# --- the JSON file ----------------------------------------------------------------------------------------


def test_typo_in_a_top_level_key():
    msg = resolve_error(ds(zero_optimization=None, zero_optimisation={"stage": 2}))
    assert "unknown key 'zero_optimisation'; did you mean 'zero_optimization'?" in msg
    assert "DeepSpeed does not read it" in resolve_error(ds(my_notes="x"))


def test_malformed_json_names_the_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "train_batch_size": "auto",\n  "gradient_clipping": 1.0,\n}\n')
    with pytest.raises(DsTrainerError, match="line 4 column 1 is not valid JSON"):
        load_ds_json(str(p))
    p.write_text("[1, 2]")
    with pytest.raises(DsTrainerError, match="must be a JSON object, got list"):
        load_ds_json(str(p))


def test_missing_json(tmp_path):
    with pytest.raises(DsTrainerError, match="nope.json not found"):
        load_ds_json(str(tmp_path / "nope.json"))


def test_no_path_gives_the_builtin_default():
    raw, source = load_ds_json(None)
    assert raw == DEFAULT_DS_CONFIG and raw is not DEFAULT_DS_CONFIG
    assert source == "built-in DeepSpeed config"


# --- every shipped JSON -----------------------------------------------------------------------------------


def is_fp16(raw: dict) -> bool:
    return raw.get("fp16", {}).get("enabled", False)


def skip_without_libaio(raw: dict) -> None:
    zero = raw.get("zero_optimization", {})
    uses_nvme = any(
        (zero.get(s) or {}).get("device") == "nvme" for s in ("offload_optimizer", "offload_param")
    )
    if not uses_nvme or os.environ.get("CI") == "true":
        return
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("libaio missing: apt-get install libaio-dev")


def test_shipped_jsons_exist():
    names = {p.stem for p in DS_JSONS}
    assert {"zero0", "zero1", "zero2", "zero3", "zero2_fp16", "zero3_offload_nvme"} <= names


@pytest.mark.parametrize("accelerator", ["cuda", "cpu"])
@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.stem)
def test_shipped_json_resolves(path, accelerator):
    raw, source = load_ds_json(str(path))
    assert source == str(path)
    run_cfg = load_run_config(str(REPO / "ds_configs" / "runs" / "tiny.yaml"))
    if accelerator == "cpu" and is_fp16(raw):
        with pytest.raises(
            DsTrainerError, match="fp16.enabled=true, but DeepSpeed does not support fp16 on the CPU"
        ):
            resolve(raw, source, run_cfg, 2, 1000, accelerator)
        return
    skip_without_libaio(raw)
    r = resolve(raw, source, run_cfg, 2, 1000, accelerator)
    assert autos(r.config) == []
    assert (r.micro_batch_size, r.gradient_accumulation_steps, r.train_batch_size) == (4, 1, 8)
    assert r.total_steps == 300
    assert r.config["optimizer"]["params"]["lr"] == 0.002
    assert r.config["scheduler"]["params"]["warmup_num_steps"] == 30
    assert r.zero_stage == int(path.stem[4])
    assert r.fp16 == is_fp16(raw) and r.fp16 != r.bf16
    assert raw == json.loads(path.read_text())  # resolve works on a copy


# --- batch ramp-up ----------------------------------------------------------------------------------------


def test_rampup_counts_optimizer_steps_and_checks_the_start_batch():
    cfg = run(
        "--train.micro_batch_size",
        "2",
        "--train.gradient_accumulation_steps",
        "4",
        "--train.max_steps",
        "10",
        "--train.rampup_start_batch",
        "4",
        "--train.rampup_samples",
        "40",
    )
    r = do_resolve(run_cfg=cfg, world=2)
    assert r.train_batch_size == 16 and r.schedule_steps == 10
    assert r.config["scheduler"]["params"]["total_num_steps"] == 10  # the schedule counts full-batch steps
    assert r.total_steps == r.batch_schedule().steps_for(160) > 10
    bad = run(
        "--train.micro_batch_size",
        "2",
        "--train.rampup_start_batch",
        "3",
        "--train.rampup_samples",
        "40",
        "--train.gradient_accumulation_steps",
        "4",
    )
    assert "train.rampup_start_batch=3 must be a multiple of micro batch 2 × 2 ranks" in resolve_error(
        run_cfg=bad, world=2
    )


@pytest.mark.parametrize("name", ["pipeline_2stage", "pipeline_4stage"])
def test_shipped_pipeline_recipes_resolve_with_the_json_they_name(name):
    """The recipe's own command line (its header comment) names the JSON; 2 data-parallel pipelines."""
    from ds_trainer.pipeline import parse_partition

    path = REPO / "ds_configs" / "runs" / f"{name}.yaml"
    json_path = re.search(r"--ds_config (\S+)", path.read_text()).group(1)
    run_cfg = load_run_config(str(path))
    stages = run_cfg.pipeline.stages
    raw, source = load_ds_json(str(REPO / json_path))
    r = resolve(raw, source, run_cfg, 2 * stages, 10**7, "cuda")
    assert (r.pipeline_stages, r.data_parallel_size) == (stages, 2)
    assert r.gradient_accumulation_steps == run_cfg.pipeline.micro_batches
    bounds = parse_partition(run_cfg.pipeline.partition, run_cfg.gpt_config().n_layer, stages)
    assert bounds in ("parameters", "uniform") or len(bounds) == stages + 1


def test_activation_checkpointing_settings():
    ac = {"partition_activations": False, "contiguous_memory_optimization": True, "number_checkpoints": None}
    msg = resolve_error(ds(activation_checkpointing=ac))
    assert "activation_checkpointing.contiguous_memory_optimization needs partition_activations=true" in msg
    assert "activation_checkpointing.contiguous_memory_optimization needs number_checkpoints" in msg
    ac = {"partition_activations": True, "contiguous_memory_optimization": True, "number_checkpoints": "auto"}
    r = do_resolve(ds(activation_checkpointing=ac), run("--model.preset", "gpt2"))
    assert r.config["activation_checkpointing"]["number_checkpoints"] == 12  # one per block
