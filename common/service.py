"""Running a service process: one event loop, clean exit on SIGINT/SIGTERM, stats on SIGUSR1."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from clusterconnect.logs import get_logger

log = get_logger(__name__)

# Counters a service may register (name -> callable returning a number), reported on SIGUSR1.
_gauges: dict[str, Callable[[], int]] = {}


def register_gauge(name: str, read: Callable[[], int]) -> None:
    _gauges[name] = read


def stats() -> dict[str, int]:
    values = {name: read() for name, read in _gauges.items()}
    values["tasks"] = len(asyncio.all_tasks())
    try:
        values["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return values


def report_stats() -> None:
    """Answer SIGUSR1: one JSON line on stderr, whatever the log level (an operator asked for it)."""
    print(json.dumps({"event": "stats", **stats()}), file=sys.stderr, flush=True)


def raise_fd_limit() -> None:
    """Every connection costs a descriptor; a relay with 10,000 agents needs more than the default 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_service(name: str, log_level: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """A service process: JSON logs and a span per connection named after ``name``, then ``run(main)``."""
    from clusterconnect.logs import configure_logging
    from clusterconnect.tracing import configure_tracing

    configure_logging(name, log_level)
    configure_tracing(name)
    run(main)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` until it returns or the process is asked to stop."""
    raise_fd_limit()

    async def supervised() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopping = False

        def stop(signame: str) -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                log.info("stopping", signal=signame)
                task.cancel()

        loop.add_signal_handler(signal.SIGINT, stop, "SIGINT")
        loop.add_signal_handler(signal.SIGTERM, stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGUSR1, report_stats)
        try:
            await main()
        except asyncio.CancelledError:
            if not stopping:
                raise

    try:
        if os.environ.get("CLUSTERCONNECT_EVENT_LOOP", "uvloop") == "uvloop":
            # uvloop halves the per-message cost of the socket side (docs/performance.md).
            uvloop.run(supervised())
        else:
            asyncio.run(supervised())
    except KeyboardInterrupt:
        pass
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


class StartupError(Exception):
    """A configuration or environment problem found at start: reported as one line, exit code 2."""
