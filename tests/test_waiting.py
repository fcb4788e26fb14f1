"""The one wait helper (deploy/local/waiting.py): a deadline, the watched process, errors that mean "not yet"."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from chain import Process
from waiting import WaitFailed, wait_until


def test_returns_the_first_true_value():
    values = iter([None, 0, "", "found", "later"])
    assert wait_until(lambda: next(values), 5, "a value", interval=0) == "found"


def test_times_out_saying_what_it_waited_for():
    started = time.monotonic()
    with pytest.raises(WaitFailed, match=r"timed out after 0.2s waiting for the moon"):
        wait_until(lambda: None, 0.2, "the moon", interval=0.01)
    assert time.monotonic() - started >= 0.2


def test_stops_as_soon_as_the_watched_process_exits(tmp_path: Path):
    log = tmp_path / "short.log"
    log.write_text("last words\n")
    popen = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    popen.wait()
    with pytest.raises(WaitFailed, match=r"(?s)short exited \(3\) while waiting for a port.*last words"):
        wait_until(lambda: None, 60, "a port", Process("short", popen, log))


def test_errors_it_ignores_are_not_yet_and_others_end_the_wait():
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise LookupError("not there yet")
        return "there"

    assert wait_until(flaky, 5, "a flaky thing", interval=0, ignoring=(LookupError,)) == "there"

    def never() -> str:
        raise LookupError("never")

    with pytest.raises(WaitFailed, match=r"(?s)waiting for nothing.*last error: LookupError\('never'\)"):
        wait_until(never, 0.1, "nothing", interval=0.01, ignoring=(LookupError,))
    with pytest.raises(ValueError):
        wait_until(lambda: int("x"), 5, "a number", ignoring=(LookupError,))
