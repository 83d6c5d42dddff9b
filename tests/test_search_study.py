"""The study: its storage, its plan enqueued once, and which worker runs which trial (no trial twice)."""

from __future__ import annotations

import itertools
import socket
import time

import optuna
import pytest
from optuna.trial import TrialState

from ds_trainer.errors import DsTrainerError
from ds_trainer.search.space import SearchSpace
from ds_trainer.search.study import (
    OWNER_ATTR,
    PLANNED_ATTR,
    Claims,
    Plan,
    grid_points,
    open_storage,
    open_study,
    owner_alive,
    owner_id,
)

SPACE = SearchSpace("space.yaml", {"train.peak_lr": [1e-3, 3e-3, 1e-2], "train.warmup_steps": [2, 8]})


def make(tmp_path, space=SPACE, sampler="grid", trials=6, objective="last_val"):
    plan = Plan(space.fingerprint(), sampler, trials, objective)
    storage = open_storage(None, tmp_path)
    return open_study(
        storage, "s", plan, space, optuna.samplers.RandomSampler(seed=1), optuna.pruners.NopPruner(), 1
    )


def test_grid_points_are_distinct_seeded_and_cover_the_grid():
    points = grid_points(SPACE, 6, seed=7)
    every = [
        dict(zip(SPACE.params, values, strict=True)) for values in itertools.product(*SPACE.params.values())
    ]
    assert sorted(map(str, points)) == sorted(map(str, every))
    assert grid_points(SPACE, 6, seed=7) == points != grid_points(SPACE, 6, seed=8)
    big = SearchSpace("book", {f"k.{i}": list(range(10)) for i in range(5)})  # 100,000 points
    sample = grid_points(big, 50, seed=1)
    assert len({str(p) for p in sample}) == 50 and all(len(p) == 5 for p in sample)


def test_the_plan_is_enqueued_once_and_a_rerun_must_match_it(tmp_path):
    study = make(tmp_path)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 6 and all(t.user_attrs[PLANNED_ATTR] for t in waiting)
    again = make(tmp_path)  # the same command again: joins, enqueues nothing
    assert len(again.get_trials()) == 6
    other = SearchSpace("space.yaml", {"train.peak_lr": [1e-3, 3e-3]})
    with pytest.raises(DsTrainerError, match=r"made by a different search \(space: .* then, .* now\)"):
        make(tmp_path, space=other, trials=2)
    with pytest.raises(DsTrainerError, match="sampler: 'grid' then, 'random' now"):
        make(tmp_path, sampler="random")


def test_workers_take_each_planned_trial_once_then_stop(tmp_path):
    study = make(tmp_path)
    a, b = Claims(study, SPACE), Claims(study, SPACE)
    seen = []
    while (claim := (a if len(seen) % 2 else b).next()) is not None:
        trial, before = claim
        assert before is None and trial.user_attrs[OWNER_ATTR] == a.owner
        seen.append(tuple(trial.params.items()))
        study.tell(trial, 1.0)
    assert len(seen) == len(set(seen)) == 6
    assert a.next() is None and len(study.get_trials()) == 6


def test_a_trial_whose_worker_died_is_taken_over_under_its_number(tmp_path):
    study = make(tmp_path, trials=2)
    claims = Claims(study, SPACE)
    trial, _ = claims.next()
    trial.report(5.0, 3)
    assert claims.next()[0].number == 1  # its own worker is alive: not an orphan
    dead = f"{socket.gethostname()}/999999999/1.00"
    trial.set_user_attr(OWNER_ATTR, dead)
    resumed, before = claims.next()
    assert resumed.number == trial.number and before.intermediate_values == {3: 5.0}
    assert resumed.params == trial.params
    assert study.get_trials()[trial.number].user_attrs[OWNER_ATTR] == claims.owner


def test_owner_liveness():
    assert owner_alive(owner_id(), None, time.time())
    assert not owner_alive(f"{socket.gethostname()}/999999999/1.00", None, time.time())
    elsewhere = "another-host/12/3.00"
    assert owner_alive(elsewhere, time.time() - 5, 0) and not owner_alive(elsewhere, time.time() - 600, 0)
    assert owner_alive(None, None, time.time()) and not owner_alive(None, None, time.time() - 600)


def test_an_unreachable_database_is_one_line(tmp_path):
    with pytest.raises(
        DsTrainerError, match=r"^--storage postgresql\+psycopg2://u@127.0.0.1:9/x: cannot open"
    ):
        open_storage("postgresql+psycopg2://u@127.0.0.1:9/x", tmp_path)
    with pytest.raises(DsTrainerError, match="cannot open the study database"):
        open_storage("nosuchdb://x", tmp_path)
