"""Where numbers go: TensorBoard, JSON lines and the console, behind one small interface, on rank 0 only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Protocol

import psutil
import torch


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


class JsonlSink:
    """One JSON object per logged step; easy to read back in tests and notebooks."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", buffering=1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), tag: text}) + "\n")

    def close(self) -> None:
        self.f.close()


class Metrics:
    """Fans out to the sinks. Built with no sinks on ranks other than 0, so callers never check the rank."""

    def __init__(self, sinks: list[Sink], console: bool) -> None:
        self.sinks = sinks
        self.console = console

    @classmethod
    def for_rank(cls, rank: int, tensorboard_dir: Path | None, jsonl_path: Path | None) -> Metrics:
        if rank != 0:
            return cls([], console=False)
        sinks: list[Sink] = []
        if tensorboard_dir is not None:
            sinks.append(TensorBoardSink(tensorboard_dir))
        if jsonl_path is not None:
            sinks.append(JsonlSink(jsonl_path))
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
    step: int, total: int, epoch: int, loss: float, lr: float, step_ms: float, tok_s: float, eta_s: float
) -> str:
    return (
        f"step {step}/{total} | epoch {epoch} | loss {loss:.3f} | lr {lr:.1e} | {step_ms:,.0f} ms/step | "
        f"{tok_s:,.0f} tok/s | eta {format_duration(eta_s)}"
    )
