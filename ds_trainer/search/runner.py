"""A search: check everything, open the study, run its trials with K workers, report each as it ends.

Each worker takes a trial (claims.py's rules), runs it as a real ds_trainer run (trial_run.py), reports
its validation losses to Optuna as they are logged, and closes it: COMPLETE with the objective, PRUNED
when the pruner stopped it, FAIL with the run's error line. SIGTERM or SIGINT to the search stops the
running trials with a checkpoint and leaves them RUNNING: the same command resumes them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from ds_trainer.config import load_run_config
from ds_trainer.errors import DsTrainerError, Problems
from ds_trainer.preemption import REQUEUE_EXIT
from ds_trainer.search import outputs
from ds_trainer.search.outputs import StudyFiles
from ds_trainer.search.space import SearchSpace, as_override, load_space
from ds_trainer.search.study import (
    BEAT_ATTR,
    BEAT_S,
    PID_ATTR,
    PLANNED_ATTR,
    Claims,
    Plan,
    open_storage,
    open_study,
)
from ds_trainer.search.trial_run import Slot, TrialOutcome, TrialRun, slots, wait_gone

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "halving", "hyperband")
OBJECTIVES = ("last_val", "best_val")
TRIALS_DIR = "trials"
OLD_RUN_WAIT_S = 900.0  # a dead search's trial saving its checkpoint after SIGTERM


@dataclass(frozen=True)
class SearchOptions:
    """launch/search.py's command line."""

    space: str
    study: str
    config: str | None = None
    ds_config: str | None = None
    storage: str | None = None
    sampler: str = "grid"
    trials: int | None = None
    pruner: str = "none"
    parallel: int = 1
    launcher: str = ""
    objective: str = "last_val"
    overrides: list[str] = field(default_factory=list)


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / TRIALS_DIR / f"{number:04d}"


def _pruner(name: str, eval_interval: int) -> optuna.pruners.BasePruner:
    """Optuna's pruners, their first rung at the run's first regular evaluation."""
    first = max(1, eval_interval)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    # The grid's points are enqueued (study.py); its trials need no sampler of their own.
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


class Search:
    """One search process: its study, its workers and what they print."""

    def __init__(self, opts: SearchOptions) -> None:
        problems = Problems()
        if opts.sampler not in SAMPLERS:
            problems.add(f"--sampler {opts.sampler}: choose one of {', '.join(SAMPLERS)}")
        if opts.pruner not in PRUNERS:
            problems.add(f"--pruner {opts.pruner}: choose one of {', '.join(PRUNERS)}")
        if opts.objective not in OBJECTIVES:
            problems.add(f"--objective {opts.objective}: choose one of {', '.join(OBJECTIVES)}")
        if opts.parallel < 1:
            problems.add(f"--parallel {opts.parallel}: run at least 1 trial at a time")
        if opts.trials is not None and opts.trials < 1:
            problems.add(f"--trials {opts.trials}: run at least 1 trial")
        if opts.ds_config and not Path(opts.ds_config).is_file():
            problems.add(f"--ds_config {opts.ds_config}: no such file")
        problems.raise_if_any()
        self.opts = opts
        self.base = load_run_config(opts.config, opts.overrides)  # the trials' shared start, checked first
        if self.base.log.jsonl is not None:
            raise DsTrainerError(
                f"log.jsonl={self.base.log.jsonl}: a search reads each trial's metrics from its run folder; "
                "remove log.jsonl from the run config"
            )
        self.space: SearchSpace = load_space(opts.space, opts.config, opts.overrides)
        self.space.check_sampler(opts.sampler)
        size = self.space.grid_size
        if opts.trials is None and size is None:
            raise DsTrainerError(f"--sampler {opts.sampler} over ranges needs --trials N (how many to run)")
        self.trials = min(opts.trials or size, size) if opts.sampler == "grid" else opts.trials
        gpus = _gpus()
        if gpus and gpus % opts.parallel:
            raise DsTrainerError(
                f"--parallel {opts.parallel} does not split this machine's {gpus} GPUs evenly"
            )
        self.slots: list[Slot] = slots(opts.parallel, gpus, os.cpu_count() or 1)
        self.folder = Path(opts.study)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.seed = self.base.train.seed
        plan = Plan(self.space.fingerprint(), opts.sampler, self.trials, opts.objective)
        storage = open_storage(opts.storage, self.folder)
        self.study = open_study(
            storage,
            str(self.folder.resolve()),
            plan,
            self.space,
            _sampler(opts.sampler, self.seed),
            _pruner(opts.pruner, self.base.eval.interval),
            self.seed,
        )
        self.claims = Claims(self.study, self.space)
        self.files = StudyFiles(self.folder, self.space, opts.config, opts.overrides, opts.ds_config)
        self.stopping = threading.Event()
        self.print_lock = threading.Lock()
        self.script_args = [
            *(["--config", opts.config] if opts.config else []),
            *(["--ds_config", opts.ds_config] if opts.ds_config else []),
            *opts.overrides,
        ]

    def say(self, line: str) -> None:
        with self.print_lock:
            print(line, flush=True)

    def banner(self) -> str:
        size = self.space.grid_size
        combos = f"{size:,} combinations ({self.space.describe()})" if size else self.space.describe()
        storage = self.opts.storage or f"{self.folder / 'study.journal'}"
        return (
            f"search: {combos} | sampler {self.opts.sampler}, pruner {self.opts.pruner} | "
            f"{self.trials:,} trials, {self.opts.parallel} at a time | study {self.folder} ({storage})"
        )

    def run(self) -> int:
        self.say(self.banner())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.files.write(self.study.get_trials(deepcopy=False))
        workers = [threading.Thread(target=self.work, args=(slot,), daemon=True) for slot in self.slots]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            for w in workers:
                w.join(timeout=0.5)
        trials = self.study.get_trials(deepcopy=False)
        self.files.write(trials)
        if self.stopping.is_set():
            self.say("search stopped: running trials saved a checkpoint; the same command resumes them")
            return REQUEUE_EXIT
        states = [t.state for t in trials if t.user_attrs.get(PLANNED_ATTR)]
        left = sum(s in (TrialState.WAITING, TrialState.RUNNING) for s in states)
        self.say(
            f"search done: {states.count(TrialState.COMPLETE)} complete, {states.count(TrialState.PRUNED)} "
            f"pruned, {states.count(TrialState.FAIL)} failed"
            + (f", {left} still with other workers" if left else "")
            + f" | {self.folder / outputs.RESULTS_FILE}, {self.folder / outputs.BEST_FILE}"
        )
        return 0

    def work(self, slot: Slot) -> None:
        while not self.stopping.is_set():
            claimed = self.claims.next()
            if claimed is None:
                return
            trial, before = claimed
            try:
                self.run_trial(trial, before, slot)
            except Exception as e:  # a broken trial must not end the other workers' trials: record it
                self.say(f"trial {trial.number}: search error: {type(e).__name__}: {e}")
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    trial.set_user_attr(outputs.ERROR, f"search error: {type(e).__name__}: {e}")
                    self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

    def run_trial(self, trial: Trial, before: FrozenTrial | None, slot: Slot) -> None:
        folder = trial_dir(self.folder, trial.number)
        seconds = 0.0
        reported: set[int] = set()
        if before is not None:  # resumed: its earlier run may still be saving the checkpoint we resume
            if before.user_attrs.get(PID_ATTR) and not wait_gone(before.user_attrs[PID_ATTR], OLD_RUN_WAIT_S):
                raise RuntimeError(f"the earlier run of trial {trial.number} did not end")
            seconds = float(before.user_attrs.get(outputs.SECONDS, 0.0))
            reported = set(before.intermediate_values)
            self.say(f"trial {trial.number}: resuming in {folder}")
        params = trial.params
        args = [*self.script_args, *(w for k, v in params.items() for w in as_override(k, v))]
        run = TrialRun(folder, self.opts.launcher, args, slot)
        started = time.monotonic()
        trial.set_user_attr(PID_ATTR, run.start())
        last_beat = time.monotonic()

        def on_val_loss(step: int, value: float) -> bool:
            if step in reported:
                return False
            reported.add(step)
            trial.report(value, step)
            return trial.should_prune()

        def stopping() -> bool:
            nonlocal last_beat
            if time.monotonic() - last_beat > BEAT_S:
                trial.set_user_attr(BEAT_ATTR, time.time())
                last_beat = time.monotonic()
            return self.stopping.is_set()

        outcome = run.follow(on_val_loss, stopping)
        seconds += time.monotonic() - started
        trial.set_user_attr(outputs.SECONDS, round(seconds, 1))
        trial.set_user_attr(outputs.STEPS, outcome.steps)
        if outcome.train_loss is not None:
            trial.set_user_attr(outputs.TRAIN_LOSS, outcome.train_loss)
        if outcome.val_losses:
            trial.set_user_attr(outputs.BEST_VAL, min(outcome.val_losses.values()))
        if outcome.stopped and self.stopping.is_set() and not trial.should_prune():
            return  # left RUNNING with its checkpoint: the next search resumes it
        self.close(trial, outcome)

    def close(self, trial: Trial, outcome: TrialOutcome) -> None:
        if outcome.stopped and outcome.exit_code == REQUEUE_EXIT:
            self.study.tell(trial, state=TrialState.PRUNED)
        elif outcome.exit_code == 0 and outcome.val_losses:
            losses = outcome.val_losses
            value = losses[max(losses)] if self.opts.objective == "last_val" else min(losses.values())
            self.study.tell(trial, value)
        else:
            error = outcome.error or "the run logged no validation loss (is eval.interval 0?)"
            trial.set_user_attr(outputs.ERROR, error)
            self.study.tell(trial, state=TrialState.FAIL)
        self.report(trial.number)

    def report(self, number: int) -> None:
        """The progress line, as the book prints after each configuration; and the study's files."""
        trials = self.study.get_trials(deepcopy=False)
        t = next(t for t in trials if t.number == number)
        finished = sum(x.state.is_finished() for x in trials if x.user_attrs.get("ds_trainer_planned"))
        values = " ".join(f"{k}={v}" for k, v in t.params.items())
        a = t.user_attrs
        if t.state == TrialState.FAIL:
            what = f"failed: {a.get(outputs.ERROR)}"
        else:
            val = (
                t.value
                if t.state == TrialState.COMPLETE
                else t.intermediate_values[max(t.intermediate_values)]
            )
            train = a.get(outputs.TRAIN_LOSS)
            what = f"{'pruned, ' if t.state == TrialState.PRUNED else ''}val loss {val:.4f}" + (
                f", train loss {train:.4f}" if train is not None else ""
            )
        line = f"trial {t.number} ({finished} of {self.trials} done) | {values} | {what} | {a.get(outputs.STEPS, 0)} steps"
        try:
            best = self.study.best_trial
            line += f" | best so far: trial {best.number}, val loss {best.value:.4f}" + (
                f", train loss {best.user_attrs[outputs.TRAIN_LOSS]:.4f}"
                if outputs.TRAIN_LOSS in best.user_attrs
                else ""
            )
        except ValueError:
            pass  # no trial complete yet
        self.say(line)
        self.files.write(trials)


def run_search(opts: SearchOptions) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress line says it once, not Optuna's too
    try:
        search = Search(opts)
    except DsTrainerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return search.run()
