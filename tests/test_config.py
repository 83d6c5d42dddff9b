"""The run config: defaults, YAML, `--section.key` overrides, and validation that reports every problem."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from ds_trainer.config import ConfigError, load_run_config
from ds_trainer.model import GPTConfig

REPO = Path(__file__).resolve().parents[1]
RUN_YAMLS = sorted((REPO / "ds_configs" / "runs").glob("*.yaml"))


def write_yaml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def config_error(path: str | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_run_config(path, overrides)
    return str(e.value)


# --- loading ----------------------------------------------------------------------------------------------


def test_defaults():
    cfg = load_run_config()
    assert cfg.model.preset == "gpt2-tiny"
    assert cfg.train.seed == 1234
    assert cfg.train.max_steps is None and cfg.train.epochs is None
    assert cfg.data.path == "" and cfg.data.val_fraction is None  # 0.1 for text, set by the data module
    assert cfg.gpt_config() == GPTConfig.from_preset("gpt2-tiny")
    assert cfg.context_length == 128 and cfg.stride == 128  # block_size, and no overlap


def test_yaml_then_cli_overrides(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model:
          dropout: 0.1
        train:
          max_steps: 50
          seed: 7
        data:
          context_length: 64
        """,
    )
    cfg = load_run_config(path, ["--train.max_steps", "80", "--model.dropout=0.2", "--data.stride=16"])
    assert cfg.train.max_steps == 80  # CLI wins over YAML
    assert cfg.model.dropout == 0.2
    assert cfg.train.seed == 7  # YAML wins over the default
    assert cfg.context_length == 64 and cfg.stride == 16
    assert cfg.gpt_config().dropout == 0.2


def test_int_widens_to_float(tmp_path):
    cfg = load_run_config(None, ["--train.epochs", "2"])
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    cfg = load_run_config(write_yaml(tmp_path, "train:\n  epochs: 3\n"))
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)


@pytest.mark.parametrize(
    ("raw", "value"), [("false", False), ("true", True), ("False", False), ("yes", True)]
)
def test_bool_parsing(raw, value):
    assert load_run_config(None, ["--checkpoint.resume", raw]).checkpoint.resume is value
    assert load_run_config(None, [f"--model.qkv_bias={raw}"]).model.qkv_bias is value


@pytest.mark.parametrize("raw", ["2024", "yes", "1.5", "[a]"])
def test_str_field_keeps_text(raw):
    assert load_run_config(None, ["--data.path", raw]).data.path == raw
    assert load_run_config(None, ["--eval.sample_prompt", raw]).eval.sample_prompt == raw


def test_null_for_optional_fields(tmp_path):
    cfg = load_run_config(write_yaml(tmp_path, "train:\n  max_steps: 10\n"), ["--train.max_steps", "null"])
    assert cfg.train.max_steps is None
    cfg = load_run_config(write_yaml(tmp_path, "train:\n  max_steps: ~\n"), ["--train.peak_lr", "None"])
    assert cfg.train.max_steps is None and cfg.train.peak_lr is None
    assert "train.seed: null is not allowed, expected int" in config_error(None, ["--train.seed", "null"])


# --- type and key errors ----------------------------------------------------------------------------------


def test_unknown_section(tmp_path):
    msg = config_error(write_yaml(tmp_path, "optimizer:\n  lr: 1\n"))
    assert "unknown section 'optimizer'" in msg and "known: model, data, train" in msg
    assert "unknown option section --optim.*" in config_error(None, ["--optim.lr", "1"])


def test_unknown_key(tmp_path):
    msg = config_error(write_yaml(tmp_path, "train:\n  max_step: 5\n"))
    assert "unknown key 'train.max_step'" in msg and "max_steps" in msg
    msg = config_error(None, ["--train.lr", "0.1"])
    assert "unknown option --train.lr" in msg and "peak_lr" in msg


def test_wrong_types(tmp_path):
    assert "--train.max_steps: expected int, got str 'abc'" in config_error(
        None, ["--train.max_steps", "abc"]
    )
    msg = config_error(write_yaml(tmp_path, "train:\n  max_steps: true\n"))
    assert "train.max_steps: expected int, got bool True" in msg
    assert "expected bool, got int 1" in config_error(None, ["--checkpoint.resume", "1"])
    assert "expected float, got str" in config_error(None, ["--train.peak_lr", "fast"])
    assert "expected str, got int 2024" in config_error(write_yaml(tmp_path, "data:\n  path: 2024\n"))


def test_malformed_arguments():
    assert "unrecognised argument 'train.seed'" in config_error(None, ["train.seed", "3"])
    assert "--train.seed: missing value" in config_error(None, ["--train.seed"])


def test_every_problem_in_one_message(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        train:
          max_step: 5
          max_steps: true
        data:
          val_fraction: 2
        bogus: {}
        """,
    )
    msg = config_error(path, ["--train.seed", "abc", "--eval.nope", "1", "--train.epochs", "-1"])
    for part in (
        "unknown key 'train.max_step'",
        "train.max_steps: expected int, got bool True",
        "--train.seed: expected int, got str 'abc'",
        "unknown option --eval.nope",
        "unknown section 'bogus'",
        "data.val_fraction must be in [0, 1), got 2",
        "train.epochs must be > 0, got -1.0",
    ):
        assert part in msg


def test_invalid_yaml_names_the_line(tmp_path):
    msg = config_error(write_yaml(tmp_path, "train:\n  max_steps: 5\n seed: 3\n"))
    assert "line 3 is not valid YAML" in msg


def test_yaml_must_be_a_mapping(tmp_path):
    assert "must be a mapping of sections, got list" in config_error(write_yaml(tmp_path, "- a\n- b\n"))
    assert "section 'train' must be a mapping, got int" in config_error(write_yaml(tmp_path, "train: 3\n"))


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert f"run config {missing} not found" in config_error(str(missing))


# --- value errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--data.val_fraction", "2"], "data.val_fraction must be in [0, 1), got 2.0"),
        (["--train.max_steps", "10", "--train.epochs", "1"], "train.max_steps and train.epochs are both set"),
        (["--data.context_length", "129"], "data.context_length 129 must be in [1, model block_size 128]"),
        (["--model.preset", "nope"], "model.preset 'nope' is unknown"),
        (["--model.n_head", "3"], "model.n_embd (64) must be divisible by model.n_head (3)"),
        (["--train.max_steps", "0"], "train.max_steps must be >= 1, got 0"),
        (["--train.peak_lr", "0"], "train.peak_lr must be > 0"),
        (["--checkpoint.dir", ""], "checkpoint.dir must not be empty"),
        (
            ["--train.host_malloc", "tcmalloc"],
            "train.host_malloc must be one of auto, keep, release, glibc, got 'tcmalloc'",
        ),
    ],
)
def test_value_problems(overrides, message):
    assert message in config_error(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--pipeline.stages", "0"], "pipeline.stages must be >= 1, got 0"),
        (["--pipeline.micro_batches", "0"], "pipeline.micro_batches must be >= 1, got 0"),
        (
            ["--pipeline.micro_batches", "4", "--train.gradient_accumulation_steps", "2"],
            "pipeline.micro_batches=4 and train.gradient_accumulation_steps=2 are the same setting; give one",
        ),
        # gpt2-tiny has 2 blocks: a third stage would hold none.
        (["--pipeline.stages", "3"], "pipeline.stages=3 exceeds model.n_layer=2; use at most 2 stages"),
        (
            ["--pipeline.stages", "2", "--train.rampup_start_batch", "4", "--train.rampup_samples", "40"],
            "train.rampup_start_batch=4 with pipeline.stages=2: the pipeline engine trains a fixed batch",
        ),
        (
            ["--pipeline.stages", "2", "--train.compile", "true"],
            "train.compile=true with pipeline.stages=2: DeepSpeed compiles one whole module, not a pipeline's "
            "stages; remove it or set pipeline.stages to 1",
        ),
    ],
)
def test_pipeline_value_problems(overrides, message):
    assert message in config_error(None, overrides)


def test_pipeline_settings_that_agree_load():
    cfg = load_run_config(
        None,
        [
            *("--pipeline.stages", "2", "--pipeline.micro_batches", "4"),
            *("--train.gradient_accumulation_steps", "4", "--pipeline.partition", "blocks:1,1"),
        ],
    )
    assert (cfg.pipeline.stages, cfg.pipeline.micro_batches, cfg.pipeline.partition) == (2, 4, "blocks:1,1")
    # As many stages as blocks is the most there can be.
    assert load_run_config(None, ["--pipeline.stages", "2"]).pipeline.stages == cfg.gpt_config().n_layer


def test_preset_null_requires_sizes():
    msg = config_error(None, ["--model.preset", "null", "--model.n_embd", "64"])
    for key in ("n_layer", "n_head", "block_size"):
        assert f"model.{key} is required when model.preset is null" in msg
    assert "model.n_embd is required" not in msg


def test_preset_null_with_sizes():
    cfg = load_run_config(
        None,
        [
            "--model.preset=null",
            "--model.n_layer=3",
            "--model.n_head=2",
            "--model.n_embd=32",
            "--model.block_size=48",
        ],
    )
    assert cfg.gpt_config() == GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=48)


# --- shipped run configs and derived paths ----------------------------------------------------------------


def test_run_yamls_exist():
    assert {p.name for p in RUN_YAMLS} >= {"tiny.yaml", "gpt2_124m.yaml"}


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: p.name)
def test_shipped_run_yaml_loads(path):
    cfg = load_run_config(str(path))
    gpt = cfg.gpt_config()
    assert gpt.problems() == []
    # The preset with exactly the model keys the file sets (dropout has the section's own default).
    model = yaml.safe_load(path.read_text())["model"]
    assert gpt == GPTConfig.from_preset(model.pop("preset"), **{"dropout": cfg.model.dropout, **model})
    assert cfg.context_length <= gpt.block_size
    train = cfg.train
    assert (train.max_steps is None) != (train.epochs is None)  # a length, in steps or in epochs
    assert train.max_steps is None or train.warmup_steps < train.max_steps


def test_log_paths_derive_from_checkpoint_dir():
    cfg = load_run_config(None, ["--checkpoint.dir", "/x/run"])
    assert cfg.run_dir == Path("/x/run")
    assert cfg.tensorboard_dir == Path("/x/run/tb")
    assert cfg.jsonl_path == Path("/x/run/metrics.jsonl")


def test_log_paths_explicit_or_disabled():
    cfg = load_run_config(None, ["--log.tensorboard_dir", "/tb", "--log.jsonl", "/m.jsonl"])
    assert cfg.tensorboard_dir == Path("/tb") and cfg.jsonl_path == Path("/m.jsonl")
    cfg = load_run_config(None, ["--log.tensorboard_dir=", "--log.jsonl="])
    assert cfg.tensorboard_dir is None and cfg.jsonl_path is None


def test_exponent_floats(tmp_path):
    assert load_run_config(None, ["--train.min_lr", "1e-5"]).train.min_lr == 1e-5
    assert load_run_config(write_yaml(tmp_path, "train:\n  peak_lr: 6e-4\n")).train.peak_lr == 6e-4


def test_exponent_floats_with_a_dot(tmp_path):
    assert load_run_config(None, ["--train.min_lr", "1.0e-5"]).train.min_lr == 1e-5
    assert load_run_config(write_yaml(tmp_path, "train:\n  peak_lr: 6.0e-4\n")).train.peak_lr == 6e-4


def test_none_stays_text_for_plain_text_fields():
    assert load_run_config(None, ["--eval.sample_prompt", "none"]).eval.sample_prompt == "none"
    assert (
        load_run_config(
            None,
            [
                "--model.preset",
                "null",
                "--model.n_layer",
                "1",
                "--model.n_head",
                "1",
                "--model.n_embd",
                "8",
                "--model.block_size",
                "8",
            ],
        ).model.preset
        is None
    )


def test_mixture_and_rampup_settings(tmp_path):
    cfg = load_run_config(None, ["--data.mixture", "{data/web: 7, data/books: 3}"])
    assert cfg.data_sources() == {"data/web": 7.0, "data/books": 3.0}
    assert load_run_config(None, ["--data.path", "x.txt"]).data_sources() == {"x.txt": 1.0}
    cfg = load_run_config(
        None,
        ["--train.rampup_start_batch", "8", "--train.rampup_tokens", "1000", "--data.context_length", "64"],
    )
    assert cfg.rampup_samples == 16  # ceil(1000 / 64)
    with pytest.raises(ConfigError) as e:
        load_run_config(
            None, ["--data.mixture", "{a: 0, b: x}", "--data.path", "c.txt", "--train.rampup_samples", "10"]
        )
    msg = str(e.value)
    assert "--data.mixture: expected a mapping of path: weight" in msg
    assert "train.rampup_samples/rampup_tokens need train.rampup_start_batch" in msg
    with pytest.raises(ConfigError) as e:
        load_run_config(
            None, ["--data.mixture", "{a: 0}", "--data.path", "c.txt", "--train.rampup_start_batch", "4"]
        )
    msg = str(e.value)
    assert "data.path and data.mixture are both set" in msg and "weight of 'a' must be > 0" in msg
    assert "needs exactly one of train.rampup_samples or train.rampup_tokens" in msg


def test_every_run_config_field_has_a_docstring():
    """The field docstrings are the run config's reference (README points there); none may be missing."""
    import ast

    from ds_trainer import config

    tree = ast.parse(Path(config.__file__).read_text())
    sections = {
        f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(config.RunConfig)
    }
    missing = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in sections):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(nxt, ast.Expr) and isinstance(
                    getattr(nxt, "value", None), ast.Constant
                )
                if not documented:
                    missing.append(f"{cls.name}.{node.target.id}")
    assert len(sections) == 8 and not missing, missing


def test_clip_from_step_must_be_a_step_and_is_refused_with_a_pipeline():
    with pytest.raises(ConfigError, match="train.clip_from_step must be >= 0, got -1"):
        load_run_config(None, ["--train.clip_from_step", "-1"])
    with pytest.raises(ConfigError, match="train.clip_from_step=5 with pipeline.stages=2"):
        load_run_config(None, ["--train.clip_from_step", "5", "--pipeline.stages", "2"])
    assert load_run_config(None, ["--train.clip_from_step", "5"]).train.clip_from_step == 5
