"""Running a service process: one event loop, clean exit on SIGINT/SIGTERM, stats on SIGUSR1, and the
metrics port (--metrics-listen: clusterconnect.metrics_server) beside the service's own work."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from clusterconnect import health, metrics
from clusterconnect.errors import ClusterConnectError
from clusterconnect.logs import get_logger
from clusterconnect.metrics_server import MetricsServer
from clusterconnect.tasks import unwrap

log = get_logger(__name__)


def register_gauge(name: str, read: Callable[[], int]) -> None:
    """A number for the SIGUSR1 stats line only; clusterconnect.metrics' gauge(..., stats=NAME) puts one
    on both the stats line and /metrics."""
    metrics.stat(name, read)


def stats() -> dict[str, int]:
    values = metrics.stats()
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


# -- giving freed memory back ------------------------------------------------------------------------
#
# A burst of connections (1,000 watches) allocates per-connection memory in glibc's heaps (gRPC call
# state, TLS buffers, Python objects). When they close, glibc keeps the freed pages resident in the
# middle of its heaps (it only gives back the top). Measured with the watches bench, 2 rounds of
# 1,000 with the first round's connections gone before the second: idle again after round 1, relay
# 139 MiB, agent 125, auth proxy 156 without a trim, 114 / 93 / 109 with one; with round 2's 1,000
# watches open, relay + agent + auth proxy 443 -> 414 MiB. A trim took 0-6 ms (in a thread).
# So a service trims once its connection count moved by a burst and then held still. Not on a
# plain timer: a trim walks every free chunk (13-48 ms for 200 MiB in 30,000 pieces, measured),
# and asking glibc how much is free (mallinfo2) costs nearly as much; the connection gauge is free.

# Trim after the number of open connections moved by this much since the last trim (a burst, not
# a trickle) and then stayed put for one check.
TRIM_AFTER_CHANGE = 100
TRIM_CHECK_INTERVAL = 0.5

_trims = {"count": 0, "last_ms": 0}


def _malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0); None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def _timed(trim: Callable[[], int]) -> None:
    started = time.perf_counter()
    trim()
    _trims["count"] += 1
    _trims["last_ms"] = round((time.perf_counter() - started) * 1000)


async def release_freed_memory(interval: float = TRIM_CHECK_INTERVAL, change: int = TRIM_AFTER_CHANGE) -> None:
    """Give glibc's freed pages back to the system after each burst of connections opening or closing."""
    trim = _malloc_trim()
    if trim is None:
        return
    trimmed_at = previous = 0
    while True:
        await asyncio.sleep(interval)
        # Registered by the service once it runs; a service without one never trims.
        now = metrics.stats_value("open_connections")
        if now == previous and abs(now - trimmed_at) >= change:
            # In a thread: the event loop goes on while glibc walks its heaps (arena by arena).
            await asyncio.to_thread(_timed, trim)
            log.debug("freed memory returned", connections=now, trim_ms=_trims["last_ms"])
            trimmed_at = now
        previous = now


def run_service(name: str, log_level: str, main: Callable[[], Coroutine[Any, Any, None]],
                metrics_listen: str = "") -> None:
    """A service process: JSON logs and a span per connection named after ``name``, then ``run(main)``
    with the metrics port on ``metrics_listen`` ("" for none)."""
    from clusterconnect.logs import configure_logging
    from clusterconnect.tracing import configure_tracing, shutdown_tracing

    configure_logging(name, log_level)
    try:
        configure_tracing(name)
    except ClusterConnectError as exc:  # an OTEL_* variable we cannot honour: one line, like a bad flag
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    try:
        run(main, metrics_listen)
    finally:
        # However main() ended (a stop signal above all): the spans still queued leave, within a bound.
        shutdown_tracing()


def run(main: Callable[[], Coroutine[Any, Any, None]], metrics_listen: str = "") -> None:
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
        register_gauge("malloc_trims", lambda: _trims["count"])
        register_gauge("malloc_trim_last_ms", lambda: _trims["last_ms"])
        try:
            # Bound before main() starts: a taken metrics port is a one-line StartupError, like any other port.
            port = await MetricsServer.open(metrics_listen) if metrics_listen else None
            # The service's own tasks beside main(): cancelled and awaited however main() ends.
            async with asyncio.TaskGroup() as tasks:
                beside = [tasks.create_task(release_freed_memory()), tasks.create_task(health.keep_grpc_status())]
                if port is not None:
                    beside.append(tasks.create_task(port.serve()))
                try:
                    await main()
                finally:
                    for companion in beside:
                        companion.cancel()
        except asyncio.CancelledError:
            if not stopping:
                raise
        except BaseExceptionGroup as failure:
            raise unwrap(failure) from None  # e.g. main()'s StartupError, reported below as one line

    try:
        if os.environ.get("CLUSTERCONNECT_EVENT_LOOP", "uvloop") == "uvloop":
            # uvloop halves the per-message cost of the socket side (docs/performance.md).
            uvloop.run(supervised())
        else:
            asyncio.run(supervised())
    except KeyboardInterrupt:
        pass
    except ClusterConnectError as exc:  # a StartupError above all: one line and its exit code
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
