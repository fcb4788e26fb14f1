"""`make bench` keeps working: every scenario at tiny sizes, one round (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_writes_json_markdown_and_plot(tmp_path, devcluster):
    # `devcluster` only orders this test after the cluster build; the bench starts a cluster of its own.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [data] = tmp_path.glob("*.json")
    scenarios = json.loads(data.read_text())["scenarios"]
    assert set(scenarios) == {"small_get", "big_list", "port_forward", "dial", "watches", "head_of_line", "scale"}
    [table] = tmp_path.glob("*.md")
    assert "| small GET | p50 latency (ms) |" in table.read_text()
    assert list(tmp_path.glob("*.png"))
