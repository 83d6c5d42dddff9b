"""What a search leaves in its study folder, rewritten from the study after each trial: `results.csv`,
`best.yaml` (the best trial's run config, ready for the full run) and TensorBoard's HParams dashboard.

Everything is derived from the study's records, so a rerun after a crash rewrites the same files.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from ds_trainer.atomic_io import write_atomic
from ds_trainer.config import load_run_config
from ds_trainer.search.space import SearchSpace, as_override
from ds_trainer.search.study import PLANNED_ATTR

RESULTS_FILE, BEST_FILE, HPARAMS_DIR = "results.csv", "best.yaml", "hparams"
# User attributes each finished trial carries (set by the worker).
TRAIN_LOSS, BEST_VAL, STEPS, SECONDS, ERROR = "train_loss", "best_val_loss", "steps", "seconds", "error"
VAL_METRIC, TRAIN_METRIC = "hparam/val_loss", "hparam/train_loss"


@dataclass(frozen=True)
class StudyFiles:
    """The study folder and how its trials were run: what best.yaml needs to say."""

    folder: Path
    space: SearchSpace
    config: str | None
    overrides: list[str]
    ds_config: str | None

    def write(self, trials: list[FrozenTrial]) -> None:
        # Only the plan's trials: one that ask() made when another worker took the last (study.py) is not.
        done = [t for t in trials if t.state != TrialState.WAITING and t.user_attrs.get(PLANNED_ATTR)]
        self._results(done)
        complete = [t for t in done if t.state == TrialState.COMPLETE and t.value is not None]
        if complete:
            self._best(min(complete, key=lambda t: t.value))
        self._hparams([t for t in done if t.state in (TrialState.COMPLETE, TrialState.PRUNED)])

    def _results(self, trials: list[FrozenTrial]) -> None:
        keys = list(self.space.params)
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["number", "state", *keys, "val_loss", BEST_VAL, TRAIN_LOSS, STEPS, SECONDS, ERROR])
        for t in sorted(trials, key=lambda t: t.number):
            a = t.user_attrs
            value = t.value if t.state == TrialState.COMPLETE else _last(t)
            row = [t.number, t.state.name, *(t.params.get(k, "") for k in keys), value]
            w.writerow(row + [a.get(k, "") for k in (BEST_VAL, TRAIN_LOSS, STEPS, SECONDS, ERROR)])
        write_atomic(self.folder / RESULTS_FILE, out.getvalue(), shared=True)

    def _best(self, best: FrozenTrial) -> None:
        overrides = [*self.overrides, *(w for k, v in best.params.items() for w in as_override(k, v))]
        config = load_run_config(self.config, overrides).to_dict()
        ds = f" --ds_config {self.ds_config}" if self.ds_config else ""
        header = (
            f"# The best trial of the search in {self.folder}: trial {best.number}, validation loss "
            f"{best.value:.4f}.\n# Its values: {', '.join(f'{k}={v}' for k, v in best.params.items())}.\n"
            f"# python launch/pretrain.py --config {self.folder / BEST_FILE}{ds} --checkpoint.dir RUN_DIR\n"
        )
        write_atomic(self.folder / BEST_FILE, header + yaml.safe_dump(config, sort_keys=False), shared=True)

    def _hparams(self, trials: list[FrozenTrial]) -> None:
        """One TensorBoard run per finished trial under hparams/, written once (the values do not change)
        by the worker that makes its folder first."""
        todo = []
        for t in trials:
            try:
                (self.folder / HPARAMS_DIR / _run_name(t)).mkdir(parents=True)
            except FileExistsError:
                continue  # written, or being written by another worker
            todo.append(t)
        if not todo:
            return
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.folder / HPARAMS_DIR)) as writer:
            for t in todo:
                metrics = {VAL_METRIC: t.value if t.state == TrialState.COMPLETE else _last(t)}
                if t.user_attrs.get(TRAIN_LOSS) is not None:
                    metrics[TRAIN_METRIC] = t.user_attrs[TRAIN_LOSS]
                hparams: dict[str, Any] = {**t.params, "state": t.state.name}
                writer.add_hparams(hparams, metrics, run_name=_run_name(t))


def _run_name(t: FrozenTrial) -> str:
    return f"trial_{t.number:04d}"


def _last(t: FrozenTrial) -> float | None:
    """A pruned trial's validation loss: its last reported one."""
    if not t.intermediate_values:
        return None
    return t.intermediate_values[max(t.intermediate_values)]
