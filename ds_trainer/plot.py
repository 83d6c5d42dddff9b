"""A run's two training pictures from its metrics.jsonl, as in "Build a LLM from Scratch" (ch. 5, app. D).

Left: training and validation loss at each evaluation against epochs, tokens seen on a second x axis on
top (the book's `plot_losses`); right: the learning rate at each logged step. One PNG, drawn with Agg.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds_trainer.errors import DsTrainerError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

METRICS_FILE = "metrics.jsonl"
DEFAULT_PNG = "training.png"
TRAIN_LOSS, VAL_LOSS = "eval/train_loss", "val/loss"
# An evaluation record says where training stood under eval/ names: its step's log record may carry the
# train/ ones, and one tag twice at one step would draw two points in TensorBoard.
LR, EPOCH, TOKENS = "train/lr", "eval/epoch", "eval/tokens_seen"
LOG_TOKENS = "train/tokens_seen"  # where a record of the step has no evaluation position (older runs)

# 1100 x 400 pixels: two panels side by side, each about the book's 5 x 3 inch figure.
FIGSIZE_IN, DPI = (11.0, 4.0), 100


@dataclass(frozen=True)
class TrainingCurves:
    """What the figure shows. The evaluation lists hold one entry per evaluation, in step order."""

    x_label: str  # "Epochs", or "Step" where an evaluation record has no eval/epoch (older runs)
    eval_steps: list[int]
    x: list[float]  # the evaluations' epochs (or steps): the loss panel's bottom axis
    tokens: list[float | None]  # tokens seen at each evaluation, where a record of its step says
    train_loss: list[float | None]  # None where the run logged no eval/train_loss (older runs)
    val_loss: list[float | None]
    lr_steps: list[int]
    lr: list[float]
    torn_lines: list[int]  # line numbers skipped: records a killed run cut short


def _records(path: Path, torn: list[int]) -> Iterator[dict[str, Any]]:
    """The file's records in order. A line that is not JSON is a record cut short by a killed run (the
    sink starts a resumed run on a fresh line): skipped, its number added to `torn`. A JSON line that is
    no record is the user's problem, named by line."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # bad JSON, or bytes that are not UTF-8
                torn.append(number)
                continue
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                raise DsTrainerError(f"{path}:{number}: not a metrics record (no integer `step`)")
            yield record


def latest_records(records: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the latest run over each step.

    A resumed run appends to the same file from its checkpoint's step, so a step below the previous
    record's starts a new segment and the records it rewrote (step >= it) are dropped. Equal steps are
    one step's log and evaluation records, not a restart. What is kept is in non-decreasing step order,
    so the rewritten records are always at the end.
    """
    kept: list[dict[str, Any]] = []
    for record in records:
        if kept and record["step"] < kept[-1]["step"]:
            while kept and kept[-1]["step"] >= record["step"]:
                kept.pop()
        kept.append(record)
    return kept


def read_curves(run_dir: str | Path) -> TrainingCurves:
    """The points to draw from RUN_DIR/metrics.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DsTrainerError(f"{run_dir}: no such run folder")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DsTrainerError(f"{run_dir}: no {METRICS_FILE} (was log.jsonl set elsewhere or empty?)")
    # One step's records (the log record, then the evaluation's) read as one: an evaluation record may
    # lack tokens seen that the log record of its step has.
    steps: dict[int, dict[str, Any]] = {}
    torn: list[int] = []
    for record in latest_records(_records(path, torn)):
        steps.setdefault(record["step"], {}).update(record)
    evals = [r for r in steps.values() if TRAIN_LOSS in r or VAL_LOSS in r]
    if not evals:
        raise DsTrainerError(
            f"{path}: no evaluation records (looked for `{VAL_LOSS}` and `{TRAIN_LOSS}`); "
            "was eval.interval 0?"
        )
    by_epoch = all(EPOCH in r for r in evals)
    logged = [r for r in steps.values() if LR in r]
    return TrainingCurves(
        x_label="Epochs" if by_epoch else "Step",
        eval_steps=[r["step"] for r in evals],
        x=[float(r[EPOCH] if by_epoch else r["step"]) for r in evals],
        tokens=[r.get(TOKENS, r.get(LOG_TOKENS)) for r in evals],
        train_loss=[r.get(TRAIN_LOSS) for r in evals],
        val_loss=[r.get(VAL_LOSS) for r in evals],
        lr_steps=[r["step"] for r in logged],
        lr=[float(r[LR]) for r in logged],
        torn_lines=torn,
    )


def _known(xs: list[float], ys: list[float | None]) -> tuple[list[float], list[float]]:
    """The (x, y) pairs where y is known, as the x list and the y list."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _tokens_axis(ax: Axes, curves: TrainingCurves) -> None:
    """Tokens seen on top of the loss panel (the book's twiny), as a linear map of the bottom axis.

    The book aligns the two axes by plotting the tokens invisibly; that needs tokens at every point.
    Fitting tokens = a * x + b on the points that know both aligns them with some missing, and is exact
    against epochs (an epoch is a fixed number of tokens).
    """
    import numpy as np
    from matplotlib.ticker import EngFormatter

    xs, tokens = _known(curves.x, curves.tokens)
    if len(set(xs)) < 2:
        return  # one point fits no line: no top axis rather than a wrong one
    a, b = np.polyfit(xs, tokens, deg=1)
    top = ax.twiny()
    top.set_xlim(*(a * x + b for x in ax.get_xlim()))
    top.xaxis.set_major_formatter(EngFormatter())
    top.set_xlabel("Tokens seen")


def write_png(curves: TrainingCurves, out: str | Path) -> Path:
    """Draw `curves` into the PNG `out` and return its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise DsTrainerError("launch/plot.py needs matplotlib: pip install -e .[plot]") from None
    # A Figure on its own Agg canvas, not pyplot: no display, and no global backend switched for callers.
    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(1, 2)
    for label, ys, style in (
        ("Training loss", curves.train_loss, "-"),
        ("Validation loss", curves.val_loss, "-."),
    ):
        xs, losses = _known(curves.x, ys)
        if xs:
            loss_ax.plot(xs, losses, style, marker=".", label=label)
    loss_ax.set_xlabel(curves.x_label)
    loss_ax.set_ylabel("Loss")
    loss_ax.legend(loc="upper right")
    if curves.x_label == "Epochs" and max(curves.x) - min(curves.x) >= 2:
        # Whole epochs, as the book; a shorter span would be left with a single tick.
        loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _tokens_axis(loss_ax, curves)
    # A line needs two points; a run logged once shows its one lr as a dot.
    lr_ax.plot(curves.lr_steps, curves.lr, marker="." if len(curves.lr) == 1 else None)
    lr_ax.set_xlabel("Step")
    lr_ax.set_ylabel("Learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.tight_layout()
    out = Path(out)
    try:
        fig.savefig(out, format="png")
    except OSError as e:
        raise DsTrainerError(f"{out}: cannot write the PNG ({e.strerror or e})") from None
    return out
