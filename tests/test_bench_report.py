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


def test_each_round_is_reported_against_the_peer_with_the_median_of_the_rounds():
    def get(added: float) -> dict:
        return {"latencies": [0.001 + added] * 100}
    results = {"rounds": 3, "smoke": False, "machine": {"cores": 2, "python": "3.11"}, "scenarios": {
        "small_get": {"direct": [get(0)] * 3, "tunnel": [get(0.002), get(0.003), get(0.0015)],
                      "konnectivity": [get(0.001)] * 3},
        "big_list": {"direct": [{"bytes": 600e6, "seconds": 1}] * 3,
                     "tunnel": [{"bytes": 180e6, "seconds": 1}, {"bytes": 220e6, "seconds": 1},
                                {"bytes": 200e6, "seconds": 1}],
                     "konnectivity": [{"bytes": 200e6, "seconds": 1}] * 3}}}
    rows = {r[0]: r for r in report.round_rows(results)}
    assert rows["small GET p50 added (ms)"] == ("small GET p50 added (ms)", "+2.00 / +1.00 (2.0×)",
                                                 "+3.00 / +1.00 (3.0×)", "+1.50 / +1.00 (1.5×)",
                                                 "2.00× (target ≤ 2×)")
    assert rows["LIST MB/s"][1:] == ("180 / 200 (0.9×)", "220 / 200 (1.1×)", "200 / 200 (1.0×)",
                                     "1.00× (target ≥ 1×)")
    assert "dial p50 added (ms)" not in rows  # a scenario that did not run
    text = report.markdown(results, "STAMP")
    assert "| metric | round 1 | round 2 | round 3 | median of rounds |\n| --- | --- | --- | --- | --- |\n" in text


def test_without_the_peer_there_is_no_round_table():
    results = {"rounds": 1, "smoke": False, "machine": {"cores": 2, "python": "3.11"}, "scenarios": {
        "small_get": {"direct": [{"latencies": [0.001]}], "tunnel": [{"latencies": [0.002]}]}}}
    assert report.round_rows(results) == []
    assert "median of rounds" not in report.markdown(results, "STAMP")
