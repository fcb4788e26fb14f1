"""A running service's gauges: SIGUSR1 makes it log one `stats` line (clusterconnect.service)."""

from __future__ import annotations

import json
import os
import signal

from chain import Process, wait_until


def stats(process: Process) -> dict:
    """Ask the process for its gauges and read the newest `stats` line."""
    before = process.log.read_text(errors="replace").count('"event": "stats"')
    os.kill(process.popen.pid, signal.SIGUSR1)

    def newest():
        lines = [l for l in process.log.read_text(errors="replace").splitlines() if '"event": "stats"' in l]
        return json.loads(lines[-1]) if len(lines) > before else None

    return wait_until(newest, 10, f"stats from {process.name}")
