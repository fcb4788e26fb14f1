"""bench/report.py: a blocked head-of-line round and a failed scenario are reported, not fatal (pure)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import report


def _results(peer_round: dict) -> dict:
    steady = {"unloaded": [0.001] * 50, "loaded": [0.0012] * 50}
    return {"rounds": 1, "smoke": False, "machine": {"cores": 2, "python": "3.11"},
            "scenarios": {"head_of_line": {"direct": [steady], "tunnel": [steady], "konnectivity": [peer_round]}},
            "errors": ["dial konnectivity: TimeoutError('timed out')"]}


def test_a_blocked_peer_round_is_named_in_its_cell_and_the_tunnel_ratio_stays():
    blocked = {"unloaded": [0.001] * 50, "loaded": [],
               "blocked": "stalled reader 2 of 10 could not connect within 10 s"}
    (row,) = [r for r in report.rows(_results(blocked)) if r[0] == "head-of-line"]
    assert row[3] == "1.20×" and row[5] == "blocked in 1/1 rounds: stalled reader 2 of 10 could not connect within 10 s"


def test_a_peer_round_that_completed_gives_its_ratio():
    (row,) = [r for r in report.rows(_results({"unloaded": [0.001] * 50, "loaded": [0.003] * 50}))
              if r[0] == "head-of-line"]
    assert row[5] == "3.00×"


def test_failures_are_listed_under_the_table():
    text = report.markdown(_results({"unloaded": [0.001], "loaded": [0.001]}), "STAMP")
    assert text.rstrip().endswith("- failed: dial konnectivity: TimeoutError('timed out')")
