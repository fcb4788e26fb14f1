"""Does the client proxy's memory level off? Small GETs through the tunnel, mixed kept-alive and new
connections, with the client proxy's RSS (and its task and descriptor counts) at every step.

    clientproxy_rss.py [--requests 50000] [--step 10000] [--concurrency 8] [--json FILE]

Each worker repeats a cycle of connections: 20 that make one GET each (a new connection per
request, as separate kubectl commands make them) and one kept alive for 80 GETs, so a fifth of the
requests open a connection. Prints one line per step; the figures in docs/performance.md come from here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path

from run import bench_setup
from scenarios import Sizes, rss_mib

# Requests per connection, repeated: 20 one-shot connections, then one kept alive for 80 requests.
CYCLE = [1] * 20 + [80]
PATH = "/api/v1/namespaces/default"


class Counter:
    """Requests handed out to the workers, up to a limit (a shared budget, not a per-worker one)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.done = 0
        self.failures = 0
        self._given = 0
        self._lock = threading.Lock()

    def take(self, wanted: int) -> int:
        with self._lock:
            granted = max(0, min(wanted, self.limit - self._given))
            self._given += granted
            return granted

    def finished(self, ok: bool) -> None:
        with self._lock:
            self.done += 1
            self.failures += not ok


def worker(endpoint, counter: Counter, offset: int) -> None:
    for per_connection in itertools.islice(itertools.cycle(CYCLE), offset, None):
        granted = counter.take(per_connection)
        if granted == 0:
            return
        try:
            conn = endpoint.connect()
        except OSError:
            for _ in range(granted):
                counter.finished(False)
            continue
        try:
            for _ in range(granted):
                try:
                    endpoint.get(conn, PATH)
                    counter.finished(True)
                except (OSError, RuntimeError):
                    counter.finished(False)
                    conn.close()
                    conn = endpoint.connect()
        finally:
            conn.close()


def measure(requests: int, step: int, concurrency: int, smoke: bool) -> list[dict]:
    with bench_setup(Sizes.smoke() if smoke else Sizes()) as (ctx, chain, _token):
        proxy = chain.processes["proxy"]
        endpoint = ctx.tunnel
        warm = endpoint.connect()
        endpoint.get(warm, PATH)  # the first request pays for the proxy's lazy set-up: not a leak
        warm.close()

        def sample(done: int, started: float) -> dict:
            stats = proxy.stats()
            row = {"requests": done, "rss_mib": round(rss_mib(proxy.popen.pid), 1), "tasks": stats.get("tasks"),
                   "fds": stats.get("fds"), "open_connections": stats.get("open_connections"),
                   "seconds": round(time.monotonic() - started, 1)}
            print(json.dumps(row), flush=True)
            return row

        started = time.monotonic()
        rows = [sample(0, started)]
        counter = Counter(requests)
        threads = [threading.Thread(target=worker, args=(endpoint, counter, i * 3), daemon=True)
                   for i in range(concurrency)]
        for thread in threads:
            thread.start()
        next_step = step
        while any(thread.is_alive() for thread in threads):
            if counter.done >= next_step:
                rows.append(sample(counter.done, started))
                next_step += step
            time.sleep(0.05)  # a sampling interval, not synchronisation: the workers run on their own
        for thread in threads:
            thread.join()
        if rows[-1]["requests"] != counter.done:
            rows.append(sample(counter.done, started))
        if counter.failures:
            print(f"{counter.failures} of {counter.done} requests failed", file=sys.stderr, flush=True)
        rows[-1]["failures"] = counter.failures
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--step", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="small cluster sizes (with --requests 500: a smoke run)")
    args = parser.parse_args()
    rows = measure(args.requests, args.step, args.concurrency, args.smoke)
    first, last = rows[0], rows[-1]
    print(f"client proxy RSS {first['rss_mib']} MiB at start, {last['rss_mib']} MiB after {last['requests']}"
          f" requests ({last['failures']} failed) in {last['seconds']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if last["failures"] or last["requests"] < args.requests:
        sys.exit(1)


if __name__ == "__main__":
    main()
