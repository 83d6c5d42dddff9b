"""Where numbers go: rank 0 only, the console line's form, the fp16 loss scale's source, and the wandb sink
(read back from wandb's own offline files)."""

from __future__ import annotations

import html
import importlib.util
import json
import re
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import REPO, ok, read_metrics, run_launch, run_pretrain, tiny_args, under_ci

from ds_trainer.config import CheckpointSection, ConfigError, LogSection, RunConfig, load_run_config
from ds_trainer.metrics import WANDB_RUN_ID_FILE, Metrics, console_line, format_duration


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0m00s"), (59.9, "0m59s"), (75, "1m15s"), (3599, "59m59s"), (3900, "1h05m"), (-3, "0m00s")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_console_line_has_the_documented_form():
    line = console_line(120, 5000, 1, 4.21349, 5.94e-4, 812.4, 1262.2, 3900)
    assert line == "step 120/5000 | epoch 1 | loss 4.213 | lr 5.9e-04 | 812 ms/step | 1,262 tok/s | eta 1h05m"
    line = console_line(120, 5000, 1, 4.21349, 5.94e-4, 812.4, 1262.2, 3900, mfu=0.2134)
    assert line == (
        "step 120/5000 | epoch 1 | loss 4.213 | lr 5.9e-04 | 812 ms/step | 1,262 tok/s | MFU 21.3% | eta 1h05m"
    )


def test_only_rank_0_writes_and_prints(tmp_path, capsys):
    for rank in (1, 0):
        log = LogSection(tensorboard_dir=str(tmp_path / f"tb{rank}"), jsonl=str(tmp_path / f"m{rank}.jsonl"))
        m = Metrics.for_rank(
            rank, RunConfig(checkpoint=CheckpointSection(dir=str(tmp_path / "run")), log=log)
        )
        m.scalars(3, {"train/loss": 2.5})
        m.text(3, "samples/text", "hello")
        m.print_line(f"line from rank {rank}")
        m.close()
    assert not (tmp_path / "tb1").exists() and not (tmp_path / "m1.jsonl").exists()
    assert capsys.readouterr().out == "line from rank 0\n"
    rows = [json.loads(line) for line in (tmp_path / "m0.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("train/loss"), r.get("samples/text")) for r in rows] == [
        (3, 2.5, None),
        (3, None, "hello"),
    ]
    assert len(list((tmp_path / "tb0").glob("events.out.tfevents.*"))) == 1


def test_every_fp16_optimizer_of_deepspeed_has_the_loss_scale_the_trainer_logs():
    """fp16 runs only on a GPU, so this checks on the classes that the attribute read exists for each layout."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # ds_trainer/trainer.py logs float(engine.optimizer.loss_scale) for fp16 runs.
    for cls in (FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(getattr(cls, "loss_scale", None), property), f"{cls.__name__} has no loss_scale"


# --- Weights & Biases -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wandb_pb2(tmp_path_factory) -> ModuleType:
    """wandb's record protobufs. `import wandb` makes two scratch folders in the system temp dir and removes
    them at interpreter exit, after the suite's /tmp check (test_hygiene.py): here they go to a test folder.

    wandb is in the test extra: outside CI a machine without it skips, under CI it must not."""
    if importlib.util.find_spec("wandb") is None:
        if under_ci():
            pytest.fail("wandb is missing under CI: .ci/run must pip install -e .[test]")
        pytest.skip("wandb is not installed: pip install -e .[wandb]")
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("wandb_import_tmp"))
    try:
        from wandb.proto import wandb_internal_pb2
    finally:
        tempfile.tempdir = saved
    return wandb_internal_pb2


# wandb 0.31 has no reader of its own for the offline `.wandb` file (the Python DataStore went with the move
# to wandb-core), so this reads the format wandb-core writes: a 7-byte header (":W&B", magic 0xBEE1,
# version 0), then LevelDB's log format (32 KiB blocks; chunks with a CRC-32 of type + data, a length and
# a type: full, first, middle, last), each record a wandb_internal_pb2.Record.
WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path, pb2: ModuleType) -> list:
    """Every record of a `.wandb` file, in order; fails on a bad header or checksum."""
    data = path.read_bytes()
    assert data[: len(WANDB_HEADER)] == WANDB_HEADER, data[:16]
    records, pending, pos = [], b"", len(WANDB_HEADER)
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if (crc, length, kind) == (0, 0, 0):  # zero padding
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum before {pos}"
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            records.append(pb2.Record.FromString(pending))
    return records


def wandb_items(items) -> dict[str, Any]:
    """History or config items as {key: value}; a nested key is joined with '.' ("samples/text.path")."""
    return {(".".join(i.nested_key) if i.nested_key else i.key): json.loads(i.value_json) for i in items}


@dataclass
class OfflineRun:
    """What one process logged to wandb offline, read back from its `offline-run-*` folder."""

    run: Any  # the RunRecord: id, project, name
    config: dict[str, Any]
    history: dict[int, dict[str, Any]]  # by step
    files: Path

    def samples(self, tag: str = "samples/text") -> dict[int, str]:
        """The text logged under `tag`, by step, from the HTML files the history names."""
        key = f"{tag}.path"  # the file's path in the run's files, one of the html-file's keys
        pages = {s: (self.files / row[key]).read_text() for s, row in self.history.items() if key in row}
        for page in pages.values():
            assert page.startswith("<pre>") and page.endswith("</pre>"), page
        return {s: html.unescape(page[len("<pre>") : -len("</pre>")]) for s, page in pages.items()}


def offline_runs(run_dir: Path, pb2: ModuleType) -> list[OfflineRun]:
    """Every offline wandb run of `run_dir`, oldest first (one per process)."""
    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        [path] = folder.glob("run-*.wandb")
        run, config, history = None, {}, {}
        for r in wandb_records(path, pb2):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
                config.update(wandb_items(r.run.config.update))
            elif kind == "config":
                config.update(wandb_items(r.config.update))
            elif kind == "history":
                history.setdefault(r.history.step.num, {}).update(wandb_items(r.history.item))
        assert run is not None, f"{path} has no run record"
        config.pop("_wandb", None)  # wandb's own bookkeeping
        out.append(OfflineRun(run, config, history, folder / "files"))
    return out


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """Offline, and every folder wandb writes outside the run folder under the test's own: its settings
    (~/.config/wandb), cache and logs (~/.cache/wandb), artifact staging (~/.local/share/wandb) and the
    scratch folders it makes in the system temp dir (removed at interpreter exit, which ranks skip)."""
    env = {"WANDB_MODE": "offline"}
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "TMPDIR"):
        env[name] = str(tmp_path / name.lower())
        Path(env[name]).mkdir()
    return env


def assert_logged_as_in_jsonl(got: OfflineRun, rows: list[dict]) -> None:
    """wandb's history holds train/loss at exactly the steps and values of these metrics.jsonl rows, and
    every other scalar of them at its step; the samples too."""
    want = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert want and {s: row["train/loss"] for s, row in got.history.items() if "train/loss" in row} == want
    for r in rows:
        scalars = {k: v for k, v in r.items() if k not in ("step", "time") and isinstance(v, int | float)}
        assert {k: got.history[r["step"]].get(k) for k in scalars} == scalars, r["step"]
    texts = {r["step"]: r["samples/text"] for r in rows if "samples/text" in r}
    assert texts and all(texts.values()) and got.samples() == texts


@pytest.mark.slow
def test_a_run_and_its_resumption_log_the_same_numbers_to_one_wandb_run(tmp_path, verdict_path, wandb_pb2):
    run_dir, env = tmp_path / "run", wandb_env(tmp_path)
    extra = {
        "eval.interval": 2,
        "eval.iters": 1,
        "eval.sample_tokens": 4,
        "log.wandb_project": "ds-trainer-test",
    }
    first = tiny_args(run_dir, verdict_path, 4, **extra)
    proc = run_pretrain(first, ranks=0, env=env)
    ok(proc)
    assert "step 4/4" in proc.stdout  # the console lines still reach the console
    rows = read_metrics(run_dir)
    [got] = offline_runs(run_dir, wandb_pb2)
    assert (got.run.project, got.run.display_name) == ("ds-trainer-test", "run")  # the run folder's name
    assert (run_dir / WANDB_RUN_ID_FILE).read_text().strip() == got.run.run_id
    # The run config as the trainer loaded it, through JSON as wandb keeps it.
    assert got.config == json.loads(json.dumps(load_run_config(overrides=first).to_dict()))
    assert_logged_as_in_jsonl(got, rows)

    # The same folder, two steps more: the training resumes from its checkpoint, wandb's run with it.
    proc = run_pretrain(tiny_args(run_dir, verdict_path, 6, **extra), ranks=0, env=env)
    ok(proc)
    assert re.search(r"resumed from \S+ at step 4\n", proc.stdout), proc.stdout
    before, resumed = offline_runs(run_dir, wandb_pb2)  # offline, each process writes its own folder
    assert before.history == got.history
    assert resumed.run.run_id == got.run.run_id
    new_rows = read_metrics(run_dir)[len(rows) :]
    assert sorted({r["step"] for r in new_rows if "train/loss" in r}) == [5, 6]
    assert_logged_as_in_jsonl(resumed, new_rows)


WANDB_MISSING = "log.wandb_project='p' needs wandb, which is not installed; pip install -e .[wandb]"


def test_asking_for_wandb_without_it_installed_is_one_clear_line(monkeypatch, tmp_path, verdict_path):
    # A None entry in sys.modules makes the import fail, and importlib.util.find_spec("wandb") return None.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"log\.wandb_project=.*pip install -e \.\[wandb\]"):
        load_run_config(overrides=["--log.wandb_project", "p"])

    # The launcher: exit code 2 and that one line, no traceback. A plain `python -c` that blocks the import
    # the same way, then runs launch/pretrain.py as its __main__.
    args = tiny_args(tmp_path / "run", verdict_path, 1, **{"log.wandb_project": "p"})
    code = (
        "import runpy, sys; sys.modules['wandb'] = None; "
        f"sys.argv = [{str(REPO / 'launch' / 'pretrain.py')!r}, *sys.argv[1:]]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = run_launch([sys.executable, "-c", code, *args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and WANDB_MISSING in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
