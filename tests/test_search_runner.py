"""launch/search.py end to end: real trials (gpt2-tiny runs of a few steps), Optuna's pruner, a killed
search resumed, two workers on one PostgreSQL study, trials in parallel, TensorBoard's HParams data."""

from __future__ import annotations

import csv
import os
import re
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import REPO, launch, ok, read_metrics, run_launch, run_pretrain, val_losses

from ds_trainer.search.runner import SearchOptions, run_search

SEARCH = str(REPO / "launch" / "search.py")
BANNER = re.compile(r"^ds_trainer \S+ \| ", re.M)  # the first line of every start of a run


def base_args(verdict_path: Path, steps: int, eval_interval: int, **extra: object) -> list[str]:
    opts = {
        "model.preset": "gpt2-tiny",
        "data.path": str(verdict_path),
        "data.context_length": 32,
        "train.micro_batch_size": 2,
        "train.max_steps": steps,
        "eval.interval": eval_interval,
        "eval.iters": 1,
        "eval.sample_tokens": 4,
        "checkpoint.save_interval": 0,
        "log.interval": 5,
        **extra,
    }
    return [w for k, v in opts.items() for w in (f"--{k}", str(v))]


def space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def search_cmd(space_path: Path, study: Path, *args: str) -> list[str]:
    return [sys.executable, SEARCH, "--space", str(space_path), "--study", str(study), *args]


def results(study: Path) -> list[dict]:
    with (study / "results.csv").open() as f:
        return list(csv.DictReader(f))


def starts(study: Path, number: int) -> int:
    return len(BANNER.findall((study / "trials" / f"{number:04d}" / "train.log").read_text()))


GRID = """
train.peak_lr: [1.0e-3, 4.0e-3]
train.warmup_steps: [2, 6]
"""


# --- bad input: one line, no trial --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "extra", "message"),
    [
        ("train.peak_lrr: [1.0e-3]\n", [], "unknown option --train.peak_lrr"),
        ("train.peak_lr: []\n", [], "train.peak_lr: empty list"),
        (
            "train.peak_lr: {low: 1.0e-2, high: 1.0e-3}\n",
            ["--sampler", "random", "--trials", "2"],
            "must be below",
        ),
        ("train.warmup_steps: [2, two]\n", [], "expected int, got str 'two'"),
        (
            GRID,
            ["--storage", "postgresql+psycopg2://nobody@127.0.0.1:9/none"],
            "cannot open the study database",
        ),
        ("train.peak_lr: {low: 1.0e-4, high: 1.0e-2}\n", [], "grid sampler needs a list"),
    ],
    ids=["unknown-key", "empty-list", "low-above-high", "wrong-type", "unreachable-storage", "range-in-grid"],
)
def test_bad_input_is_one_line_and_starts_no_trial(tmp_path, capsys, text, extra, message):
    study = tmp_path / "study"
    argv = ["--space", str(space(tmp_path, text)), "--study", str(study), *extra]
    opts = dict(zip(argv[0::2], argv[1::2], strict=True))
    code = run_search(
        SearchOptions(
            space=opts["--space"],
            study=opts["--study"],
            storage=opts.get("--storage"),
            sampler=opts.get("--sampler", "grid"),
            trials=int(opts["--trials"]) if "--trials" in opts else None,
        )
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (study / "trials").exists()


def test_a_study_folder_refuses_another_space_from_the_command_line(tmp_path, verdict_path):
    study = tmp_path / "study"
    first = run_launch(
        search_cmd(space(tmp_path, GRID), study, "--trials", "1", *base_args(verdict_path, 2, 2))
    )
    ok(first)
    other = tmp_path / "other.yaml"
    other.write_text("train.peak_lr: [1.0e-3, 2.0e-3, 4.0e-3]\n")
    proc = run_launch(search_cmd(other, study, *base_args(verdict_path, 2, 2)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "was made by a different search" in lines[0] and "--study" in lines[0]
    assert [r["number"] for r in results(study)] == ["0"]  # nothing was run or lost


# --- real searches ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_2x2_grid_in_parallel_runs_four_trials_and_best_yaml_reruns_exactly(tmp_path, verdict_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    study = tmp_path / "study"
    args = base_args(verdict_path, 12, 4)
    proc = run_launch(search_cmd(space(tmp_path, GRID), study, "--parallel", "2", *args))
    ok(proc)
    assert "search: 4 combinations (train.peak_lr x 2, train.warmup_steps x 2)" in proc.stdout
    assert len(re.findall(r"^trial \d \(\d of 4 done\) \| .*val loss [\d.]+, train loss [\d.]+ .*best so far: "
                          r"trial \d, val loss", proc.stdout, re.M)) == 4, proc.stdout  # fmt: skip

    rows = results(study)
    assert sorted(r["number"] for r in rows) == ["0", "1", "2", "3"]
    assert {(float(r["train.peak_lr"]), int(r["train.warmup_steps"])) for r in rows} == {
        (1e-3, 2), (1e-3, 6), (4e-3, 2), (4e-3, 6)
    }  # fmt: skip
    assert all(r["state"] == "COMPLETE" and r["steps"] == "12" for r in rows)
    for r in rows:  # the objective is the trial's last validation loss, as its run logged it
        assert float(r["val_loss"]) == val_losses(study / "trials" / f"{int(r['number']):04d}")[12]
        assert starts(study, int(r["number"])) == 1

    # Two trials at once: their runs' logged times overlap.
    spans = [(m[0]["time"], m[-1]["time"]) for m in (read_metrics(p) for p in (study / "trials").iterdir())]
    spans.sort()
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans

    # best.yaml holds the best trial's values; run alone it gives the same validation loss, exactly.
    best = min(rows, key=lambda r: float(r["val_loss"]))
    text = (study / "best.yaml").read_text()
    assert f"trial {best['number']}, validation loss" in text
    assert (
        f"peak_lr: {float(best['train.peak_lr'])}" in text
        and f"warmup_steps: {best['train.warmup_steps']}" in text
    )
    rerun = tmp_path / "rerun"
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}  # as the search gave the trial
    ok(run_pretrain(["--config", str(study / "best.yaml"), "--checkpoint.dir", str(rerun)], ranks=0,
                    env={**os.environ, **threads}))  # fmt: skip
    assert val_losses(rerun)[12] == float(best["val_loss"])

    # TensorBoard's HParams dashboard: each trial with its values and losses, read with TensorBoard's reader.
    seen = {}
    for folder in sorted((study / "hparams").glob("trial_*")):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for content in acc.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                hp = data.session_start_info.hparams
                values = (hp["train.peak_lr"].number_value, hp["train.warmup_steps"].number_value)
        seen[values] = acc.Scalars("hparam/val_loss")[0].value
    assert seen == pytest.approx(
        {(float(r["train.peak_lr"]), float(r["train.warmup_steps"])): float(r["val_loss"]) for r in rows}
    )


@pytest.mark.slow
def test_successive_halving_stops_the_worst_trials_with_a_checkpoint(tmp_path, verdict_path):
    study = tmp_path / "study"
    steps = 40
    lrs = space(tmp_path, "train.peak_lr: [1.0e-6, 3.0e-3, 1.0e-5, 1.0e-2]\n")
    args = base_args(verdict_path, steps, 8, **{"train.warmup_steps": 2})
    proc = run_launch(search_cmd(lrs, study, "--pruner", "halving", *args))
    ok(proc)
    rows = results(study)
    pruned = [r for r in rows if r["state"] == "PRUNED"]
    assert pruned and len(rows) == 4, proc.stdout
    # The best rate runs to the end; the others stop at a rung where they trail (the grid's order is seeded).
    assert [r["state"] for r in rows if float(r["train.peak_lr"]) == 1e-2] == ["COMPLETE"]
    assert {float(r["train.peak_lr"]) for r in pruned} >= {1e-6, 1e-5}
    assert sum(int(r["steps"]) for r in rows) < 4 * steps  # fewer steps than without pruning
    for r in pruned:
        folder = study / "trials" / f"{int(r['number']):04d}"
        stopped = int(r["steps"])
        assert stopped < steps and (folder / "latest").read_text() == f"step_{stopped:08d}"
        assert f"stopping at step {stopped}: received SIGUSR1" in (folder / "train.log").read_text()
    assert re.search(r"^trial \d \(\d of 4 done\) \| .* \| pruned, val loss", proc.stdout, re.M)


@pytest.mark.slow
def test_a_killed_search_resumes_its_running_trial_and_runs_none_twice(tmp_path, verdict_path):
    study = tmp_path / "study"
    cmd = search_cmd(
        space(tmp_path, GRID), study, *base_args(verdict_path, 40, 10, **{"checkpoint.save_interval": 5})
    )
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = launch(cmd, stdout=out, stderr=out)
    second = study / "trials" / "0001"
    deadline = time.monotonic() + 300
    while not (second / "latest").is_file():
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    os.kill(
        first.pid, signal.SIGKILL
    )  # the search only: its running trial gets SIGTERM from the orphan guard
    first.wait(timeout=30)
    proc = run_launch(cmd)
    ok(proc)
    rows = results(study)
    assert sorted(r["number"] for r in rows) == ["0", "1", "2", "3"] and {r["state"] for r in rows} == {
        "COMPLETE"
    }
    assert sorted(p.name for p in (study / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]
    assert [starts(study, n) for n in range(4)] == [1, 2, 1, 1]
    resumed = re.search(r"resumed from \S+ at step (\d+)", (second / "train.log").read_text())
    assert resumed and 5 <= int(resumed.group(1)) < 40
    assert "trial 1: resuming in" in proc.stdout
    assert "trial 0 (" not in proc.stdout  # finished before the kill: not run again


@pytest.mark.slow
def test_two_workers_share_one_study_through_postgresql(tmp_path, verdict_path, postgres_server):
    url = postgres_server.new_database("search_two_workers")
    study = tmp_path / "study"
    cmd = search_cmd(space(tmp_path, GRID), study, "--storage", url, *base_args(verdict_path, 8, 4))
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    workers = []
    for path in logs:
        with path.open("w") as out:
            workers.append(launch(cmd, stdout=out, stderr=out))
    for w, path in zip(workers, logs, strict=True):
        assert w.wait(timeout=600) == 0, path.read_text()[-3000:]
    rows = results(study)
    assert sorted(r["number"] for r in rows) == ["0", "1", "2", "3"] and {r["state"] for r in rows} == {
        "COMPLETE"
    }
    assert [starts(study, n) for n in range(4)] == [1, 1, 1, 1]
    done = [set(re.findall(r"^trial (\d) \(", p.read_text(), re.M)) for p in logs]
    assert done[0] and done[1] and not done[0] & done[1] and done[0] | done[1] == {"0", "1", "2", "3"}


@pytest.mark.slow
def test_a_failing_trial_is_recorded_with_its_error_line_and_the_search_goes_on(tmp_path, verdict_path):
    study = tmp_path / "study"
    batches = space(tmp_path, "train.micro_batch_size: [2, 4096]\n")  # 4096 windows: more than the data has
    proc = run_launch(search_cmd(batches, study, *base_args(verdict_path, 4, 2)))
    ok(proc)
    rows = {r["train.micro_batch_size"]: r for r in results(study)}
    assert rows["2"]["state"] == "COMPLETE" and rows["4096"]["state"] == "FAIL"
    assert rows["4096"]["error"].startswith("error: ") and "4096" in rows["4096"]["error"]
    assert re.search(
        r"^trial \d \(\d of 2 done\) \| train.micro_batch_size=4096 \| failed: error: ", proc.stdout, re.M
    )
    assert "search done: 1 complete, 0 pruned, 1 failed" in proc.stdout
