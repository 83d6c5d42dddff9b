"""The Optuna study behind a search: its storage, its plan of trials, and which worker runs which trial.

The plan is fixed when the study is made: the trials to run are enqueued then (the grid's points, or empty
trials that the random or TPE sampler fills in when they start), and a worker takes one by `study.ask()`,
which moves a waiting trial to running in one storage transaction. So two workers never run the same
trial and a grid point runs once, on one machine or many (Optuna's GridSampler alone can hand the same
point to two workers at once). A trial stays RUNNING while its worker lives; the owner and a heartbeat in
its user attributes let a later search take over the trials of a worker that died and resume each under
its own number, from its own checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import FrozenTrial, Trial, TrialState

from ds_trainer.errors import DsTrainerError
from ds_trainer.search.space import Range, SearchSpace

JOURNAL_FILE = "study.journal"
PLAN_ATTR = "ds_trainer_plan"  # the study's space, sampler and number of trials: what a rerun must match
READY_ATTR = "ds_trainer_ready"  # set once every planned trial is enqueued
PLANNED_ATTR = "ds_trainer_planned"  # on each enqueued trial: a trial without it was not planned
OWNER_ATTR, BEAT_ATTR, PID_ATTR = "worker", "heartbeat", "pid"
BEAT_S = 10.0  # a running trial's heartbeat
STALE_S = 60.0  # a worker on another host silent this long is dead
CLAIM_SETTLE_S = 1.0  # two searches claiming one orphan: the last owner written wins, after this wait
READY_WAIT_S = 120.0
SCHEMA_RACE_TRIES = 5


@dataclass(frozen=True)
class Plan:
    """What a study was made with; a rerun or another worker with anything else is refused."""

    space: str  # SearchSpace.fingerprint()
    sampler: str
    trials: int
    objective: str

    def to_json(self) -> str:
        return json.dumps(vars(self), sort_keys=True)


def open_storage(url: str | None, study_dir: Path) -> optuna.storages.BaseStorage:
    """A journal file in the study folder (one machine, or a shared file system), or an RDB URL
    (PostgreSQL: several nodes on one study)."""
    if url is None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(study_dir / JOURNAL_FILE)))
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    try:
        for attempt in range(SCHEMA_RACE_TRIES):
            try:
                return optuna.storages.RDBStorage(url)
            except (IntegrityError, ProgrammingError):
                # Workers starting together all create Optuna's tables; the losers of that race see
                # duplicate types or tables, and find the tables made when they try again.
                if attempt == SCHEMA_RACE_TRIES - 1:
                    raise
                time.sleep(1.0 + random.random())
    except Exception as e:  # sqlalchemy's errors (bad URL, no server, no driver) all end the search here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DsTrainerError(
            f"--storage {url}: cannot open the study database ({reason}); check the URL, the server and "
            "its driver (PostgreSQL: pip install -e .[search])"
        ) from None


def grid_points(space: SearchSpace, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` distinct grid points in a seeded random order (the whole grid when n is its size), decoded from
    their indices so that the book's 38,880-point grid is never listed in full."""
    grid = space.grid()
    size = math.prod(len(v) for v in grid.values())
    points = []
    for index in random.Random(seed).sample(range(size), n):
        point = {}
        for key, values in reversed(grid.items()):
            index, i = divmod(index, len(values))
            point[key] = values[i]
        points.append(dict(reversed(point.items())))
    return points


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    plan: Plan,
    space: SearchSpace,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    seed: int,
) -> optuna.Study:
    """Make the study and enqueue its plan, or join the one made before (by an earlier run of the same
    command or by another worker) after checking it was made with the same plan."""
    try:
        study = optuna.create_study(
            storage=storage, sampler=sampler, pruner=pruner, study_name=name, direction="minimize"
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        _check_plan(study, plan)
        return study
    study.set_user_attr(PLAN_ATTR, plan.to_json())
    points = grid_points(space, plan.trials, seed) if plan.sampler == "grid" else [{}] * plan.trials
    for point in points:
        study.enqueue_trial(point, user_attrs={PLANNED_ATTR: True})
    study.set_user_attr(READY_ATTR, True)
    return study


def _check_plan(study: optuna.Study, plan: Plan) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    while PLAN_ATTR not in study.user_attrs or READY_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise DsTrainerError(
                f"study {study.study_name}: its plan was never completed (the search that made it died while "
                "enqueueing); start a new study folder"
            )
        time.sleep(1.0)
    made = json.loads(study.user_attrs[PLAN_ATTR])
    if made != json.loads(plan.to_json()):
        diff = ", ".join(
            f"{k}: {made.get(k)!r} then, {v!r} now" for k, v in vars(plan).items() if made.get(k) != v
        )
        raise DsTrainerError(
            f"study {study.study_name} was made by a different search ({diff}); rerun it with the same "
            "space and options, or start a new --study folder"
        )


def owner_id() -> str:
    """This search process, as no other process on any host will be: host, pid and start time."""
    return f"{socket.gethostname()}/{os.getpid()}/{psutil.Process().create_time():.2f}"


def owner_alive(owner: str | None, heartbeat: float | None, started: float) -> bool:
    """Whether the worker that owns a running trial still runs: checked directly on this host, by its
    heartbeat on another."""
    now = time.time()
    if owner is None:  # between ask() and the owner written: a moment, unless its worker died there
        return now - started < STALE_S
    host, pid, created = owner.rsplit("/", 2)
    if host == socket.gethostname():
        try:
            return f"{psutil.Process(int(pid)).create_time():.2f}" == created
        except psutil.NoSuchProcess:
            return False
    return heartbeat is not None and now - heartbeat < STALE_S


class Claims:
    """Which trial this process's workers run next: a trial whose worker died (resumed under its number),
    else the next planned one. One lock for this process's worker threads; the storage for the rest."""

    def __init__(self, study: optuna.Study, space: SearchSpace) -> None:
        self.study = study
        self.space = space
        self.owner = owner_id()
        self.lock = threading.Lock()

    def next(self) -> tuple[Trial, FrozenTrial | None] | None:
        """A trial to run, with its earlier record if it is resumed; None when nothing is left."""
        with self.lock:
            orphan = self._orphan()
            if orphan is not None:
                return orphan
            return self._planned()

    def _orphan(self) -> tuple[Trial, FrozenTrial] | None:
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = frozen.user_attrs
            started = frozen.datetime_start.timestamp() if frozen.datetime_start else time.time()
            if owner_alive(attrs.get(OWNER_ATTR), attrs.get(BEAT_ATTR), started):
                continue
            # Optuna has no public way to reopen a running trial by number; its id is on the record.
            trial = Trial(self.study, frozen._trial_id)
            trial.set_user_attr(OWNER_ATTR, self.owner)
            trial.set_user_attr(BEAT_ATTR, time.time())
            time.sleep(CLAIM_SETTLE_S)  # another search may be claiming it too: the later write wins
            now = next(t for t in self.study.get_trials(deepcopy=False) if t.number == frozen.number)
            if now.state == TrialState.RUNNING and now.user_attrs.get(OWNER_ATTR) == self.owner:
                return trial, frozen
        return None

    def _planned(self) -> tuple[Trial, None] | None:
        if not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        trial = self.study.ask()
        if not trial.user_attrs.get(PLANNED_ATTR):
            # Another worker took the last waiting trial between our look and our ask, so ask() made a new
            # one: close it at once, so the study holds exactly its plan's trials.
            trial.set_user_attr("error", "not planned: another worker took the last waiting trial")
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        trial.set_user_attr(OWNER_ATTR, self.owner)
        trial.set_user_attr(BEAT_ATTR, time.time())
        suggest(trial, self.space)
        return trial, None


def suggest(trial: Trial, space: SearchSpace) -> dict[str, Any]:
    """The trial's values: a grid trial's enqueued point, else what the sampler picks."""
    for key, values in space.params.items():
        if isinstance(values, Range) and values.is_int:
            trial.suggest_int(key, int(values.low), int(values.high), log=values.log)
        elif isinstance(values, Range):
            trial.suggest_float(key, values.low, values.high, log=values.log)
        else:
            trial.suggest_categorical(key, values)
    return trial.params
