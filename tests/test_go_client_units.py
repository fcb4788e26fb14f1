"""The Go client's own tests that need no cluster (clients/go/conn_test.go: a relay of the test's
own), with the race detector, `go vet` and gofmt; the e2e tests skip without the environment that
tests/test_go_client.py sets."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

GO_MODULE = Path(__file__).resolve().parent.parent / "clients" / "go"
UNIT_TESTS = ["TestRefusalCarriesTheRelaysStatus", "TestHalfCloseAndEOF", "TestBrokenTunnelReadsTheStatus",
              "TestReadDeadline", "TestCloseCancelsTheStream", "TestDialContextBoundsTheOpening"]


def go(*args: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CLUSTERCONNECT_TEST_")}
    return subprocess.run(["go", *args], cwd=GO_MODULE, env=env, capture_output=True, text=True, timeout=1200)


def test_go_vet_and_gofmt() -> None:
    result = go("vet", "./...")
    assert result.returncode == 0, result.stdout + result.stderr
    unformatted = subprocess.run(["gofmt", "-l", "."], cwd=GO_MODULE, capture_output=True, text=True, timeout=60)
    assert unformatted.returncode == 0 and not unformatted.stdout, f"run gofmt -w on: {unformatted.stdout}"


def test_go_unit_tests() -> None:
    result = go("test", "-count=1", "-race", "-v", "-run", "^(" + "|".join(UNIT_TESTS) + ")$", ".")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    passed = set(re.findall(r"^--- PASS: (\w+)", output, re.MULTILINE))
    assert set(UNIT_TESTS) <= passed, f"not run: {set(UNIT_TESTS) - passed}"
