"""The DeepSpeed JSON: "auto" values filled from the run config, derived steps, device and typo checks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from helpers import under_ci

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
    if not uses_nvme or under_ci():
        return
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("libaio missing: apt-get install libaio-dev")


def nvme_in(raw: dict, folder: Path) -> dict:
    """`raw` with its NVMe folders moved to `folder`: the shipped one would be made in /tmp, which the
    suite leaves as it found it (test_hygiene)."""
    for section in (raw.get("zero_optimization") or {}).values():
        if isinstance(section, dict) and "nvme_path" in section:
            section["nvme_path"] = str(folder)
    return raw


def test_shipped_jsons_exist():
    names = {p.stem for p in DS_JSONS}
    assert {"zero0", "zero1", "zero2", "zero3", "zero2_fp16", "zero3_offload_nvme"} <= names


@pytest.mark.parametrize("accelerator", ["cuda", "cpu"])
@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.stem)
def test_shipped_json_resolves(path, accelerator, tmp_path):
    raw, source = load_ds_json(str(path))
    assert source == str(path)
    raw = nvme_in(raw, tmp_path / "nvme")
    given = copy.deepcopy(raw)
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
    assert r.zero_stage == raw["zero_optimization"]["stage"]
    assert not path.stem.startswith("zero") or r.zero_stage == int(path.stem[4])  # zeroN*.json is stage N
    assert r.fp16 == is_fp16(raw) and r.bf16 == bool((raw.get("bf16") or {}).get("enabled"))
    assert not (r.fp16 and r.bf16)
    assert raw == given  # resolve works on a copy


def test_a_compile_section_needs_train_compile():
    raw, source = load_ds_json(str(REPO / "ds_configs" / "zero3.json"))
    raw["compile"] = {"deepcompile": False}
    off = load_run_config(str(REPO / "ds_configs" / "runs" / "tiny.yaml"))
    with pytest.raises(
        DsTrainerError, match="compile tunes torch.compile, which is off; set train.compile true"
    ):
        resolve(raw, source, off, 2, 1000, "cpu")
    on = load_run_config(str(REPO / "ds_configs" / "runs" / "tiny.yaml"), ["--train.compile", "true"])
    assert resolve(raw, source, on, 2, 1000, "cpu").config["compile"] == {"deepcompile": False}


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


# --- DeepSpeed's own models and our checks (ds_validate) ---------------------------------------------------


def with_optimizer(type_: str, zero: dict | None = None, **params) -> dict:
    return ds(
        optimizer={"type": type_, "params": {"lr": "auto", **params}}, zero_optimization=zero or {"stage": 0}
    )


def test_zero_stage_out_of_range_is_deepspeeds_own_check():
    """DeepSpeedZeroConfig's pydantic error, as one of our lines: the dotted key, the value, what it must be."""
    msg = resolve_error(ds(zero_optimization={"stage": 5}))
    assert msg == "test.json: zero_optimization.stage=5 must be 0, 1, 2 or 3"


def test_deepspeed_model_errors_name_nested_keys_and_typos():
    zero = {
        "stage": 3,
        "reduce_bucket_size": 0,
        "stage3_prefetch_bucket_sze": 10,
        "offload_param": {"device": "gpu", "buffer_count": -1, "pin_memroy": True},
    }
    msg = resolve_error(ds(zero_optimization=zero), accelerator="cuda")
    assert "zero_optimization.reduce_bucket_size=0 must be greater than 0" in msg
    assert (
        "unknown key 'zero_optimization.stage3_prefetch_bucket_sze'; did you mean 'stage3_prefetch_bucket_size'?"
        in msg
    )
    assert "zero_optimization.offload_param.device=\"gpu\" must be 'none', 'cpu' or 'nvme'" in msg
    assert "zero_optimization.offload_param.buffer_count=-1 must be greater than or equal to 0" in msg
    assert "unknown key 'zero_optimization.offload_param.pin_memroy'; did you mean 'pin_memory'?" in msg


@pytest.mark.parametrize(
    "betas", [[0.9], [0.9, 1.0], [-0.1, 0.95], "0.9, 0.95", [0.9, "0.95"], [0.9, 0.95, 0.99]]
)
def test_betas_must_be_two_numbers_below_one(betas):
    msg = resolve_error(with_optimizer("AdamW", betas=betas))
    assert msg == (
        f"test.json: optimizer.params.betas={json.dumps(betas)} must be a list of two numbers in [0, 1), "
        "e.g. [0.9, 0.95]"
    )


def test_optimizer_numbers_are_checked_all_at_once():
    raw = with_optimizer("AdamW", eps=0, weight_decay=-0.1)
    raw["optimizer"]["params"]["lr"] = -1
    msg = resolve_error(raw)
    assert "optimizer.params.lr=-1 must be a number > 0" in msg
    assert "optimizer.params.eps=0 must be a number > 0" in msg
    assert "optimizer.params.weight_decay=-0.1 must be a number >= 0" in msg
    assert "optimizer.params.momentum=1 must be a number in [0, 1)" in resolve_error(
        with_optimizer("SGD", momentum=1)
    )


def test_warmup_longer_than_the_run():
    """WarmupCosineLR would warm up past the end: the run never trains at its peak learning rate."""
    sched = copy.deepcopy(DEFAULT_DS_CONFIG["scheduler"])
    sched["params"]["warmup_num_steps"] = 1000
    msg = resolve_error(ds(scheduler=sched), run("--train.max_steps", "20"))
    assert msg == (
        "test.json: scheduler.params.warmup_num_steps=1000 is longer than the run's 20 steps (train.max_steps=20), "
        'so the learning rate never reaches its peak; set it to at most 20 or "auto" (10% of the run)'
    )
    msg = resolve_error(run_cfg=run("--train.max_steps", "20", "--train.warmup_steps", "21"))
    assert "train.warmup_steps=21 is longer than the run's 20 steps (train.max_steps=20)" in msg
    assert do_resolve(run_cfg=run("--train.max_steps", "20", "--train.warmup_steps", "20")).total_steps == 20
    warmup_lr = {"type": "WarmupLR", "params": {"warmup_num_steps": 30, "warmup_max_lr": 0.001}}
    msg = resolve_error(ds(scheduler=warmup_lr), run("--train.max_steps", "20"))
    assert "scheduler.params.warmup_num_steps=30 is longer than the run's 20 steps" in msg


EQUALITY_TEST_SGD = {
    "optimizer": {"type": "SGD", "params": {"lr": 0.5, "momentum": 0}},
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
}


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.stem)
def test_plain_sgd_passes_in_every_shipped_layout(path, tmp_path):
    """The equality tests train with torch.optim.SGD, which DeepSpeed builds from the JSON in any layout."""
    raw = nvme_in({**json.loads(path.read_text()), **copy.deepcopy(EQUALITY_TEST_SGD)}, tmp_path / "nvme")
    skip_without_libaio(raw)
    r = do_resolve(raw, run("--train.peak_lr", "0.5"), accelerator="cuda" if is_fp16(raw) else "cpu")
    assert r.config["optimizer"] == EQUALITY_TEST_SGD["optimizer"]


def test_an_optimizer_zero_has_not_tested_needs_the_flag():
    sgd = with_optimizer("SGD", {"stage": 1}, momentum=0)
    msg = resolve_error(sgd)
    assert (
        'optimizer.type="SGD" builds SGD, which DeepSpeed has not tested with ZeRO (zero_optimization.stage=1); '
        'add "zero_allow_untested_optimizer": true to use it' in msg
    )
    do_resolve({**sgd, "zero_allow_untested_optimizer": True})
    do_resolve(with_optimizer("SGD", {"stage": 0}))  # no ZeRO, no such check in DeepSpeed
    do_resolve(with_optimizer("AdamW", {"stage": 2}))  # FusedAdam is on ZeRO's tested list


def test_optimizer_params_are_the_ones_the_built_class_takes():
    """DeepSpeed passes params to the class it builds for the layout; a name it does not take is a TypeError there."""
    offload = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    do_resolve(with_optimizer("AdamW", set_grad_none=True))  # FusedAdam takes it
    msg = resolve_error(with_optimizer("AdamW", offload, set_grad_none=True))
    assert (
        "unknown key 'optimizer.params.set_grad_none': DeepSpeed builds DeepSpeedCPUAdam here; it takes"
        in msg
    )
    msg = resolve_error(with_optimizer("AdamW", adamw_mode=True))
    assert (
        "unknown key 'optimizer.params.adamw_mode': DeepSpeed builds FusedAdam here; did you mean 'adam_w_mode'?"
        in msg
    )
    do_resolve(
        with_optimizer("AdamW", offload, adam_w_mode=True, fp32_optimizer_states=True)
    )  # DeepSpeed pops these
    do_resolve(with_optimizer("AdamW", torch_adam=True, foreach=False))  # torch.optim.AdamW
    msg = resolve_error(with_optimizer("SGD", betas=[0.9, 0.95]))
    assert "unknown key 'optimizer.params.betas': DeepSpeed builds SGD here" in msg
    do_resolve(with_optimizer("RMSprop", alpha=0.9, centered=True))  # any torch.optim class, its own names
    msg = resolve_error(with_optimizer("AdamW", max_grad_norm=1.0))
    assert (
        'optimizer.params.max_grad_norm is not supported by DeepSpeed; use the top-level "gradient_clipping"'
        in msg
    )


def test_unknown_optimizer_and_scheduler_types():
    assert (
        'optimizer.type="sgd" is neither a DeepSpeed optimizer nor one of torch.optim; did you mean "SGD"?'
        in (resolve_error(with_optimizer("sgd")))
    )
    assert 'did you mean "AdamW"?' in resolve_error(with_optimizer("AdamWW"))
    do_resolve(with_optimizer("adamw"))  # DeepSpeed's own names in any case
    msg = resolve_error(ds(scheduler={"type": "WarmupCosineLRR", "params": {}}))
    assert msg == (
        'test.json: scheduler.type="WarmupCosineLRR" is neither a DeepSpeed scheduler nor one of '
        'torch.optim.lr_scheduler; did you mean "WarmupCosineLR"?'
    )
    msg = resolve_error(ds(scheduler={"type": "StepLR", "params": {"gamma": 0.5}}))
    assert "scheduler.params.step_size is required by StepLR; set it" in msg
    do_resolve(ds(scheduler={"type": "StepLR", "params": {"step_size": 10}}))


def test_scheduler_params_are_checked():
    sched = {
        "type": "WarmupCosineLR",
        "params": {"warmup_type": "cubic", "cos_min_ratio": 1.5, "warmup_ratio": 0.1},
    }
    msg = resolve_error(ds(scheduler=sched))
    assert 'scheduler.params.warmup_type="cubic" must be one of "log", "linear"' in msg
    assert "scheduler.params.cos_min_ratio=1.5 must be a number in [0, 1]" in msg
    assert "unknown key 'scheduler.params.warmup_ratio': DeepSpeed builds WarmupCosineLR here" in msg


def test_top_level_values_and_sections_deepspeed_reads_unchecked():
    raw = ds(
        gradient_clipping=-1,
        steps_per_print=0,
        wall_clock_breakdown="no",
        activation_checkpointing={"partitioned_activations": True, "profile": "false"},
        aio={"block_size": 0},
    )
    msg = resolve_error(raw)
    assert "gradient_clipping=-1 must be a number >= 0" in msg
    assert "steps_per_print=0 must be an integer >= 1" in msg
    assert 'wall_clock_breakdown="no" must be true or false' in msg
    assert (
        "unknown key 'activation_checkpointing.partitioned_activations'; did you mean 'partition_activations'?"
        in msg
    )
    assert (
        'activation_checkpointing.profile="false" must be true or false' in msg
    )  # a string DeepSpeed takes as true
    assert "aio.block_size=0 must be an integer >= 1" in msg


def test_fp16_ranges_deepspeed_leaves_open():
    fp16 = {"enabled": True, "hysteresis": 0, "initial_scale_power": -1}
    msg = resolve_error(ds(fp16=fp16), accelerator="cuda")
    assert "fp16.hysteresis=0 must be a number >= 1" in msg
    assert "fp16.initial_scale_power=-1 must be a number >= 0" in msg
    assert do_resolve(ds(fp16={"enabled": True, "initial_scale_power": "auto"}), accelerator="cuda").fp16


def test_auto_stays_valid_where_deepspeed_accepts_it():
    """DeepSpeed's models drop a section's "auto" values (the default applies); the trainer reads them so too."""
    raw = ds(
        zero_optimization={"stage": "auto", "reduce_bucket_size": "auto"},
        fp16={"enabled": "auto"},
        bf16={"enabled": "false"},
    )
    r = do_resolve(raw)  # on the CPU: fp16 "auto" is off, so not refused as fp16
    assert (r.zero_stage, r.fp16, r.bf16) == (0, False, False)
    assert do_resolve(ds(bf16={"enabled": "true"})).bf16


def test_sections_of_the_wrong_type_are_reported():
    raw = ds(fp16=True, zero_optimization=2)
    raw["optimizer"]["params"] = [0.9]
    msg = resolve_error(raw)
    assert "fp16 must be a JSON object {...}, got true" in msg
    assert "zero_optimization must be a JSON object {...}, got 2" in msg
    assert "optimizer.params must be a JSON object {...}, got [0.9]" in msg
    msg = resolve_error(ds(zero_optimization={"stage": 2, "offload_optimizer": "cpu"}))
    assert 'zero_optimization.offload_optimizer="cpu" must be a valid dictionary' in msg


def test_a_bad_ratio_beside_seed_style_settings_is_reported():
    sched = copy.deepcopy(DEFAULT_DS_CONFIG["scheduler"])
    sched["params"]["warmup_min_ratio"] = "x"
    msg = resolve_error(ds(scheduler=sched), run("--train.initial_lr", "0.0001"))
    assert 'scheduler.params.warmup_min_ratio="x" must be a number in [0, 1]' in msg


def test_deepspeeds_own_parser_is_the_last_check():
    """What DeepSpeedConfig refuses and no check above knows, e.g. communication_data_type; only when all else is fine."""
    msg = resolve_error(ds(communication_data_type="fp8"))
    assert msg == (
        "test.json: DeepSpeed refuses this config: Invalid communication_data_type. "
        "Supported data types: ['fp16', 'bf16', 'fp32']. Got: fp8"
    )
    msg = resolve_error(ds(communication_data_type="fp8", zero_optimization={"stage": 5}))
    assert "DeepSpeed refuses" not in msg and "zero_optimization.stage=5" in msg


def test_the_issue_cases_in_one_message():
    raw = ds(zero_optimization={"stage": 5})
    raw["optimizer"]["params"]["betas"] = [0.9]
    raw["scheduler"]["params"]["warmup_num_steps"] = 1000
    msg = resolve_error(raw, run("--train.max_steps", "20"))
    assert msg.count("test.json: ") == 3
    assert "zero_optimization.stage=5" in msg and "optimizer.params.betas=[0.9]" in msg
    assert "warmup_num_steps=1000 is longer than the run's 20 steps" in msg


def test_writable_folder_problem(tmp_path):
    from ds_trainer.run_folders import writable_folder_problem

    (tmp_path / "file").write_text("")
    msg = writable_folder_problem(tmp_path / "file" / "run", "checkpoint.dir")
    assert (
        msg
        == f"checkpoint.dir={tmp_path / 'file' / 'run'} cannot be created: {tmp_path / 'file'} is a file; choose another folder"
    )
    msg = writable_folder_problem("/proc/ds_trainer/run", "checkpoint.dir")
    assert msg.startswith(
        "checkpoint.dir=/proc/ds_trainer/run cannot be created or written (No such file or directory in /proc)"
    )
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert "is a broken symbolic link" in writable_folder_problem(tmp_path / "link" / "run", "checkpoint.dir")
    before = sorted(tmp_path.rglob("*"))
    assert writable_folder_problem(tmp_path / "a" / "b", "checkpoint.dir") is None
    assert writable_folder_problem(tmp_path, "checkpoint.dir") is None
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, nothing left behind


def test_folder_problems_of_a_run(tmp_path):
    """checkpoint.dir on every rank; metrics paths set explicitly only on rank 0, the rank that writes them."""
    from ds_trainer.run_folders import folder_problems

    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "x"
    cfg = run("--checkpoint.dir", str(tmp_path / "run"), "--log.tensorboard_dir", str(blocked))
    assert folder_problems(cfg, 1) == []
    (msg,) = folder_problems(cfg, 0)
    assert msg.startswith(f"log.tensorboard_dir={blocked} cannot be created")
    cfg = run("--checkpoint.dir", str(blocked), "--log.jsonl", str(blocked / "m.jsonl"))
    assert [m.split("=")[0] for m in folder_problems(cfg, 0)] == ["checkpoint.dir", "log.jsonl"]
    assert [m.split("=")[0] for m in folder_problems(cfg, 1)] == ["checkpoint.dir"]


def test_weight_decay_and_max_norm_fill_the_json_like_every_auto_value():
    """train.weight_decay / train.max_norm fill "auto" or absent keys; a number they contradict is named."""

    def resolved(raw, *overrides):
        return resolve(raw, "ds.json", load_run_config(None, list(overrides)), 1, 1000, "cpu").config

    default = resolved(DEFAULT_DS_CONFIG)
    assert (default["optimizer"]["params"]["weight_decay"], default["gradient_clipping"]) == (0.1, 1.0)
    book = resolved(DEFAULT_DS_CONFIG, "--train.weight_decay", "0.05", "--train.max_norm", "0")
    assert (book["optimizer"]["params"]["weight_decay"], book["gradient_clipping"]) == (0.05, 0)
    bare = {k: v for k, v in DEFAULT_DS_CONFIG.items() if k != "gradient_clipping"}
    bare["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    assert "gradient_clipping" not in resolved(bare)  # absent and unset: DeepSpeed's own default, as before
    filled = resolved(bare, "--train.max_norm", "0.5", "--train.weight_decay", "0")
    assert (filled["optimizer"]["params"]["weight_decay"], filled["gradient_clipping"]) == (0, 0.5)
    numbers = {**DEFAULT_DS_CONFIG, "gradient_clipping": 1.0}
    numbers["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}}
    with pytest.raises(DsTrainerError) as e:
        resolved(numbers, "--train.max_norm", "2", "--train.weight_decay", "0.2")
    assert "ds.json: gradient_clipping=1.0 disagrees with train.max_norm=2.0" in str(e.value)
    assert "optimizer.params.weight_decay=0.1 disagrees with train.weight_decay=0.2" in str(e.value)
    with pytest.raises(DsTrainerError, match="train.max_norm must be >= 0, got -1"):
        load_run_config(None, ["--train.max_norm", "-1"])


def test_an_aio_key_deepspeed_renamed_is_refused_with_its_new_name():
    """DeepSpeed 0.19 reads aio.intra_op_parallelism and ignores the thread_count of older configs."""
    cfg = ds(aio={"block_size": 1048576, "thread_count": 2})
    with pytest.raises(DsTrainerError) as e:
        do_resolve(cfg)
    assert str(e.value) == (
        "test.json: unknown key 'aio.thread_count'; DeepSpeed 0.19 reads it as 'aio.intra_op_parallelism'"
    )
    with pytest.raises(DsTrainerError, match="unknown key 'aio.queue_depht'; did you mean 'queue_depth'"):
        do_resolve(ds(aio={"queue_depht": 8}))
