"""launch/plot.py: the points it draws from a real JsonlSink's file (resumed runs too), the PNG, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from ds_trainer.errors import DsTrainerError
from ds_trainer.metrics import JsonlSink
from ds_trainer.plot import DEFAULT_PNG, METRICS_FILE, latest_records, read_curves, write_png

# The run the records describe: 8 steps an epoch of 256 tokens each, logged every 5 steps, evaluated every 10.
STEPS_PER_EPOCH, TOKENS_PER_STEP = 8, 256


def lr(step: int) -> float:
    return 1e-4 * step


def log_values(step: int) -> dict[str, float]:
    return {
        "train/loss": 9.0 - step / 10,
        "train/lr": lr(step),
        "train/tokens_seen": float(step * TOKENS_PER_STEP),
        "train/epoch": step / STEPS_PER_EPOCH,
    }


def eval_values(step: int, run: int) -> dict[str, float]:
    """Losses carry `run` so that a point shows which run wrote it."""
    return {
        "eval/train_loss": 5 - step / 100 + run,
        "val/loss": 6 - step / 100 + run,
        "eval/epoch": step / STEPS_PER_EPOCH,
        "eval/tokens_seen": float(step * TOKENS_PER_STEP),
    }


def write_run(run_dir: Path, run: int, first: int, last: int, eval_every: int = 10) -> None:
    """One run (or resumed run) appending steps first..last to run_dir/metrics.jsonl, as the trainer does."""
    sink = JsonlSink(run_dir / METRICS_FILE)
    for step in range(first, last + 1):
        if step % 5 == 0:
            sink.scalars(step, log_values(step))
        if eval_every and step % eval_every == 0:
            sink.scalars(step, eval_values(step, run))
            sink.text(step, "samples/text", f"sample of run {run}")
    sink.close()


@pytest.fixture
def resumed(tmp_path) -> Path:
    """Run 0 reached step 40; run 1 resumed from the step-20 checkpoint and reached 60; run 2 resumed from
    the step-49 checkpoint, evaluating every 20 steps: its first record is at a step run 1 evaluated."""
    write_run(tmp_path, 0, 1, 40)
    write_run(tmp_path, 1, 21, 60)
    write_run(tmp_path, 2, 50, 60, eval_every=20)
    return tmp_path


def test_one_point_per_evaluation_against_epochs(tmp_path):
    write_run(tmp_path, 0, 1, 40)
    c = read_curves(tmp_path)
    assert c.x_label == "Epochs"
    assert c.eval_steps == [10, 20, 30, 40]
    assert c.x == [1.25, 2.5, 3.75, 5.0]
    assert c.tokens == [2560.0, 5120.0, 7680.0, 10240.0]
    assert c.train_loss == [4.9, 4.8, 4.7, 4.6]
    assert c.val_loss == [5.9, 5.8, 5.7, 5.6]
    assert c.lr_steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert c.lr == [lr(s) for s in c.lr_steps]


def test_a_resumed_run_replaces_the_steps_it_rewrote(resumed):
    rows = latest_records(
        iter([{"step": 10, "run": 0}, {"step": 20, "run": 0}, {"step": 20, "run": 0}, {"step": 30, "run": 0},
              {"step": 20, "run": 1}, {"step": 30, "run": 1}, {"step": 5, "run": 2}, {"step": 5, "run": 2}])
    )  # fmt: skip
    # Equal steps are one step's records; a lower step drops every earlier record at or after it.
    assert [(r["step"], r["run"]) for r in rows] == [(5, 2), (5, 2)]
    rows = latest_records(iter([{"step": 10, "run": 0}, {"step": 20, "run": 0}, {"step": 20, "run": 1}]))
    assert [(r["step"], r["run"]) for r in rows] == [(10, 0), (20, 0), (20, 1)]
    rows = latest_records(iter([{"step": 10, "run": 0}, {"step": 20, "run": 0}, {"step": 30, "run": 0},
                                {"step": 20, "run": 1}]))  # fmt: skip
    assert [(r["step"], r["run"]) for r in rows] == [(10, 0), (20, 1)]

    c = read_curves(resumed)
    # Steps 10-20 from run 0, 30-40 from run 1 (run 0's dropped), 60 from run 2 (run 1's 50 and 60 dropped).
    assert c.eval_steps == [10, 20, 30, 40, 60]
    assert c.train_loss == [4.9, 4.8, 5.7, 5.6, 6.4]
    assert c.val_loss == [5.9, 5.8, 6.7, 6.6, 7.4]
    assert c.x == [s / STEPS_PER_EPOCH for s in c.eval_steps]
    assert c.tokens == [float(s * TOKENS_PER_STEP) for s in c.eval_steps]
    assert c.lr_steps == list(range(5, 61, 5))


def test_an_older_run_plots_validation_loss_against_steps(tmp_path):
    sink = JsonlSink(tmp_path / METRICS_FILE)
    for step in (10, 20, 30):
        sink.scalars(step, {"train/lr": lr(step), "train/tokens_seen": float(step * TOKENS_PER_STEP)})
        sink.scalars(step, {"val/loss": 6 - step / 100})
    sink.close()
    c = read_curves(tmp_path)
    assert (c.x_label, c.x, c.eval_steps) == ("Step", [10.0, 20.0, 30.0], [10, 20, 30])
    assert c.train_loss == [None, None, None] and c.val_loss == [5.9, 5.8, 5.7]
    assert write_png(c, tmp_path / "old.png").stat().st_size > 0


def test_missing_matplotlib_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    write_run(tmp_path, 0, 1, 20)
    for name in ("matplotlib", "matplotlib.backends.backend_agg", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of a None entry raises ImportError
    with pytest.raises(DsTrainerError) as e:
        write_png(read_curves(tmp_path), tmp_path / "x.png")
    assert str(e.value) == "launch/plot.py needs matplotlib: pip install -e .[plot]"


def plot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "plot.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("out", [None, "elsewhere.png"])
def test_the_launcher_writes_a_two_panel_png(resumed, out):
    png = resumed / (out or DEFAULT_PNG)
    proc = plot(str(resumed), *(["--out", str(png)] if out else []))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {png}: 5 evaluation points, 12 lr points\n" and proc.stderr == ""
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape == (400, 1100, 4)
    rgb = pixels[..., :3].reshape(-1, 3)
    # Not blank: lines and text in several colours (the two loss curves, the lr curve, black axes).
    assert len({tuple(p) for p in rgb[::7].round(2).tolist()}) >= 10
    assert (rgb < 0.9).any(axis=1).mean() > 0.01


# Each makes a bad run folder `d` (or none) and returns the launcher's arguments for it.
def missing(d: Path) -> list[str]:
    return [str(d)]


def no_metrics(d: Path) -> list[str]:
    d.mkdir()
    return [str(d)]


def bad_line(d: Path) -> list[str]:
    write_run(d, 0, 1, 5)  # line 1: step 5's log record
    with (d / METRICS_FILE).open("a") as f:
        f.write('["step", 6]\n')  # line 2: JSON, but no record
    write_run(d, 0, 10, 10)
    return [str(d)]


def test_a_record_cut_short_by_a_kill_is_skipped_and_the_resumed_run_reads_on(tmp_path):
    """A SIGKILL mid-write leaves a partial line; the sink starts the resumed run on a fresh line."""
    run = tmp_path / "run"
    write_run(run, 0, 1, 15)
    partial = len((run / METRICS_FILE).read_text().splitlines()) + 1
    with (run / METRICS_FILE).open("a") as f:
        f.write('{"step": 16, "val/lo')  # the killed run's last, partial record
    write_run(run, 0, 6, 20)  # resumed from step 5: a new JsonlSink appends, first at step 10
    proc = plot(str(run))
    assert proc.returncode == 0, proc.stderr
    curves = read_curves(run)
    assert curves.torn_lines == [partial]
    assert curves.lr_steps == [5, 10, 15, 20]  # the resumed run's first record (step 10) is on its own line
    assert max(curves.eval_steps) == 20 and curves.eval_steps == sorted(set(curves.eval_steps))
    assert "records cut short by a killed run" in proc.stdout


def no_evals(d: Path) -> list[str]:
    write_run(d, 0, 1, 20, eval_every=0)
    return [str(d)]


def out_in_no_folder(d: Path) -> list[str]:
    write_run(d, 0, 1, 20)
    return [str(d), "--out", str(d / "no" / "such" / "folder.png")]


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (missing, "run: no such run folder"),
        (no_metrics, "run: no metrics.jsonl"),
        (bad_line, "metrics.jsonl:2: not a metrics record (no integer `step`)"),
        (
            no_evals,
            "no evaluation records (looked for `val/loss` and `eval/train_loss`); was eval.interval 0?",
        ),
        (out_in_no_folder, "folder.png: cannot write the PNG"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, make, problem):
    proc = plot(*make(tmp_path / "run"))
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], lines
