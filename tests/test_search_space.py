"""The search space: YAML over run-config keys, every value checked by the run config's own loader."""

from __future__ import annotations

import textwrap

import pytest
from helpers import REPO

from ds_trainer.config import load_run_config
from ds_trainer.errors import DsTrainerError
from ds_trainer.search.space import Range, as_override, load_space

BOOK_GRID = REPO / "ds_configs" / "search" / "book_grid.yaml"
SEARCH_YAMLS = sorted((REPO / "ds_configs" / "search").glob("*.yaml"))


def space_file(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_the_books_grid_has_its_38880_combinations_over_run_config_keys():
    space = load_space(str(BOOK_GRID), str(REPO / "ds_configs" / "runs" / "appendix_d.yaml"), [])
    assert space.grid_size == 38_880 == 4 * 3 * 3 * 3 * 3 * 4 * 2 * 3 * 5
    assert space.params["train.peak_lr"] == [1e-4, 5e-4, 1e-3, 5e-3]
    assert space.params["train.epochs"] == [5, 10, 15, 20, 25]
    assert set(space.params) == {
        "train.micro_batch_size", "model.dropout", "train.warmup_steps", "train.weight_decay",
        "train.max_norm", "train.peak_lr", "train.initial_lr", "train.min_lr", "train.epochs",
    }  # fmt: skip


@pytest.mark.parametrize("path", SEARCH_YAMLS, ids=lambda p: p.name)
def test_shipped_spaces_load_on_the_default_run_config(path):
    space = load_space(str(path), None, [])
    assert space.grid_size and space.grid_size >= 4
    space.check_sampler("grid")


def test_ranges_and_lists_read_as_the_samplers_need(tmp_path):
    space = load_space(
        space_file(
            tmp_path,
            """
            train.peak_lr: {low: 1.0e-4, high: 1.0e-2, log: true}
            train.warmup_steps: {low: 2, high: 30}
            model.dropout: [0.0, 0.1]
            """,
        ),
        None,
        [],
    )
    assert space.params["train.peak_lr"] == Range(1e-4, 1e-2, True)
    assert space.params["train.warmup_steps"].is_int
    assert space.grid_size is None
    with pytest.raises(
        DsTrainerError, match=r"grid sampler needs a list .* train.peak_lr, train.warmup_steps"
    ):
        space.check_sampler("grid")
    space.check_sampler("tpe")


def test_every_problem_is_reported_at_once(tmp_path):
    path = space_file(
        tmp_path,
        """
        train.peak_lrr: [1.0e-3]
        train.warmup_steps: []
        train.min_lr: {low: 1.0e-3, high: 1.0e-4}
        train.micro_batch_size: [2, 2.5]
        model.dropout: {low: 0.0, high: 0.5, log: true}
        train.max_norm: 1.0
        """,
    )
    with pytest.raises(DsTrainerError) as e:
        load_space(path, None, [])
    message = str(e.value)
    assert "\n" not in message
    assert "train.peak_lrr: value 0.001: unknown option --train.peak_lrr" in message
    assert "train.warmup_steps: empty list" in message
    assert "train.min_lr: low (0.001) must be below high (0.0001)" in message
    assert (
        "train.micro_batch_size: value 2.5: --train.micro_batch_size: expected int, got float 2.5" in message
    )
    assert "model.dropout: a log range needs low > 0" in message
    assert "train.max_norm: expected a list of values or a range" in message


def test_values_are_checked_against_the_run_config_the_trials_start_from(tmp_path):
    path = space_file(tmp_path, "data.context_length: [64, 256]\n")
    load_space(path, None, ["--model.preset", "gpt2-tiny", "--model.block_size", "256"])
    with pytest.raises(
        DsTrainerError, match=r"context_length: value 256: .*must be in \[1, model block_size 128\]"
    ):
        load_space(path, None, ["--model.preset", "gpt2-tiny"])


@pytest.mark.parametrize("value", [1e-4, 3, True, "gpt2-tiny", 0.1])
def test_overrides_read_back_to_the_same_value(value):
    key = {str: "model.preset", bool: "train.decay_all_parameters", int: "train.warmup_steps"}.get(
        type(value), "train.peak_lr"
    )
    cfg = load_run_config(None, as_override(key, value)).to_dict()
    section, name = key.split(".")
    assert cfg[section][name] == value and type(cfg[section][name]) is type(value)
