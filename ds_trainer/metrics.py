"""Where numbers go: TensorBoard, JSON lines, Weights & Biases and the console, behind one small interface,
on rank 0 only."""

from __future__ import annotations

import html
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil
import torch

from ds_trainer.errors import DsTrainerError

if TYPE_CHECKING:
    from ds_trainer.config import RunConfig


class Sink(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def text(self, step: int, tag: str, text: str) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1)


class JsonlSink:
    """One JSON object per logged step; easy to read back in tests and notebooks."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", buffering=1)
        if self.f.tell() and _last_byte(path) != b"\n":
            # A run killed mid-write left a partial record: start this run's on a line of its own.
            self.f.write("\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), tag: text}) + "\n")

    def close(self) -> None:
        self.f.close()


# The wandb run id of a run folder: a resumed run (same folder) continues the same wandb run.
WANDB_RUN_ID_FILE = "wandb_run_id"


class WandbSink:
    """The same scalars and samples in a Weights & Biases run, through wandb's own client.

    wandb is an optional extra (pip install -e .[wandb]), so it is imported here, only when a run asks
    for it; config.py has already checked that it is installed. Its files go under `<run_dir>/wandb/`
    (offline runs in `offline-run-*/`, to upload later with `wandb sync`).
    """

    def __init__(self, project: str, entity: str, name: str, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        try:
            # resume="allow": continue the run with this id if wandb knows it, else start it under that id.
            self.run = wandb.init(
                project=project,
                entity=entity or None,
                name=name or run_dir.name,
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow",
            )
        except wandb.errors.Error as e:  # no API key, no network, unknown entity: the user's to fix
            raise DsTrainerError(
                f"log.wandb_project={project!r}: wandb could not start a run: {e} "
                "(WANDB_MODE=offline logs without a network)"
            ) from e
        if run_id is None:
            # Written once wandb has chosen the id, so the file never names a run that was not started.
            id_file.write_text(self.run.id + "\n")
        self.wandb = wandb

    def scalars(self, step: int, values: dict[str, float]) -> None:
        # At the trainer's step, as TensorBoard, so a step's scalars and sample share one wandb row. Online,
        # a resumed wandb run goes on from the last step it holds: the steps a resumed training repeats
        # (those after its checkpoint) are below it, and wandb drops them with a warning, keeping the
        # values logged first.
        self.run.log(dict(values), step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        # wandb.Html of the text in <pre>: wandb's media panel shows it as written (newlines and spaces
        # kept), with a slider over the steps, and it is a file in the run's media/html/ folder, read back
        # as is (wandb reads a string as a path only if it names an .html file; this one starts "<pre>").
        # A wandb.Table would show samples side by side, but each log makes a table artifact whose scratch
        # folder in the system temp dir wandb removes only at interpreter exit, which the ranks skip
        # (process.end_process); a plain string is shown only as the run's last value.
        page = f"<pre>{html.escape(text)}</pre>"
        self.run.log({tag: self.wandb.Html(page, inject=False)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Metrics:
    """Fans out to the sinks. Built with no sinks on ranks other than 0, so callers never check the rank."""

    def __init__(self, sinks: list[Sink], console: bool) -> None:
        self.sinks = sinks
        self.console = console

    @classmethod
    def for_rank(cls, rank: int, run: RunConfig) -> Metrics:
        """The sinks `run` asks for (TensorBoard, JSON lines, wandb when log.wandb_project is set) on rank 0;
        none on the other ranks."""
        if rank != 0:
            return cls([], console=False)
        sinks: list[Sink] = []
        log = run.log
        try:
            if run.tensorboard_dir is not None:
                sinks.append(TensorBoardSink(run.tensorboard_dir))
            if run.jsonl_path is not None:
                sinks.append(JsonlSink(run.jsonl_path))
            if log.wandb_project:
                sinks.append(
                    WandbSink(
                        log.wandb_project, log.wandb_entity, log.wandb_run_name, run.run_dir, run.to_dict()
                    )
                )
        except BaseException:
            # A sink that cannot start (wandb with no API key) fails the run; those already open are closed.
            for s in sinks:
                s.close()
            raise
        return cls(sinks, console=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for s in self.sinks:
            s.scalars(step, values)

    def text(self, step: int, tag: str, text: str) -> None:
        for s in self.sinks:
            s.text(step, tag, text)

    def print_line(self, line: str) -> None:
        """`line` on the console (rank 0's; the other ranks print nothing)."""
        if self.console:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def memory_scalars() -> dict[str, float]:
    out = {"mem/host_rss_gb": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["mem/device_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        out["mem/device_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(
    step: int,
    total: int,
    epoch: int,
    loss: float,
    lr: float,
    step_ms: float,
    tok_s: float,
    eta_s: float,
    mfu: float | None = None,
) -> str:
    utilisation = "" if mfu is None else f"MFU {mfu:.1%} | "
    return (
        f"step {step}/{total} | epoch {epoch} | loss {loss:.3f} | lr {lr:.1e} | {step_ms:,.0f} ms/step | "
        f"{tok_s:,.0f} tok/s | {utilisation}eta {format_duration(eta_s)}"
    )
