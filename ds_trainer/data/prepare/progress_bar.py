"""The progress bar on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

from __future__ import annotations

import sys
import time


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


class _ProgressBar:
    def __init__(self, total_bytes: int, enabled: bool, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.total = max(1, total_bytes)
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.shown = False

    def update(self, done_bytes: int, new_tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        frac = min(1.0, done_bytes / self.total)
        rate = done_bytes / dt
        eta = (self.total - done_bytes) / rate if rate > 0 else 0.0
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = (
            f"prepare [{bar}] {frac * 100:5.1f}% {done_bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB | "
            f"{rate / 1e6:.1f} MB/s | {_fmt_count(new_tokens / dt)} tok/s | {_fmt_count(new_tokens)} tokens | "
            f"eta {_fmt_seconds(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.enabled and self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
