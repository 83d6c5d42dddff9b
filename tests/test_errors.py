"""How a rank reports a user error: rank 0 at once, other ranks only if the launcher has not stopped them."""

from __future__ import annotations

import signal
import time

from ds_trainer.errors import DsTrainerError, report_on_rank


def test_rank_zero_reports_at_once(capsys):
    start = time.monotonic()
    assert report_on_rank(DsTrainerError("train.max_steps: expected int"), 0, grace_s=5.0) == 2
    assert time.monotonic() - start < 2.5  # far below the 5 s grace, with slack for a loaded machine
    assert capsys.readouterr().err == "error: train.max_steps: expected int\n"


def test_other_rank_waits_then_reports_with_its_rank(capsys):
    before = signal.getsignal(signal.SIGTERM)
    try:
        start = time.monotonic()
        assert report_on_rank(DsTrainerError("/nvme not writable"), 3, grace_s=0.3) == 2
        waited = time.monotonic() - start
        stop_handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert waited >= 0.3
    assert stop_handler == signal.SIG_DFL  # a launcher's SIGTERM ends the wait at once
    assert capsys.readouterr().err == "error: rank 3: /nvme not writable\n"
