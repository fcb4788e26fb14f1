"""CPU time each tunnel process spends per operation, read from /proc; optionally py-spy profiles too.

    cpu_profile.py [--requests 2000] [--dials 200] [--lists 5] [--py-spy DIR] [--smoke]

Through the tunnel: small GETs on one keep-alive connection, new connections (one GET each, 50 ms
apart), and LISTs (50 MiB; small with --smoke); prints the CPU of each process per request, per dial and per MB, beside
the latencies of direct access in the same run. With --py-spy, DIR gets one raw py-spy profile per
process and phase (`py-spy record -f raw`: one line per stack, count last). The per-hop figures
in docs/performance.md come from this script.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from run import SERVICES, bench_setup
from scenarios import Sizes, big_list, prepare_big_list

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy" / "local"))
from chain import cpu_seconds  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"


@contextmanager
def profiled(pids: dict[str, int], out: Path | None, phase: str):
    """py-spy on every process for the duration of the block (nothing if ``out`` is None)."""
    spies = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, pid in pids.items():
            spies.append(subprocess.Popen(
                [str(PY_SPY), "record", "-r", "250", "-f", "raw", "-o", str(out / f"{phase}-{name}.txt"),
                 "-p", str(pid), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)  # py-spy attaches
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait()


def per_process_cpu(pids: dict[str, int], operation, count: int) -> tuple[list[float], dict[str, float]]:
    """Run ``operation`` ``count`` times; its latencies and each process's CPU seconds per operation."""
    before = {name: cpu_seconds([pid]) for name, pid in pids.items()}
    latencies = [operation() for _ in range(count)]
    return latencies, {name: (cpu_seconds([pid]) - before[name]) / count for name, pid in pids.items()}


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--dials", type=int, default=200)
    parser.add_argument("--lists", type=int, default=5)
    parser.add_argument("--py-spy", type=Path, help="directory for raw py-spy profiles")
    parser.add_argument("--smoke", action="store_true", help="a small LIST: keeps the script working")
    args = parser.parse_args()
    with bench_setup(Sizes.smoke() if args.smoke else Sizes()) as (ctx, _chain, _token):
        pids = {name: ctx.pids[name] for name in SERVICES}
        path = "/api/v1/namespaces/default"

        def gets(endpoint):
            conn = endpoint.connect()
            for _ in range(50):
                endpoint.get(conn, path)
            with profiled(pids if endpoint is ctx.tunnel else {}, args.py_spy, "get"):
                result = per_process_cpu(pids, lambda: timed(lambda: endpoint.get(conn, path)), args.requests)
            conn.close()
            return result

        def dials(endpoint):
            def one() -> float:
                start = time.perf_counter()
                conn = endpoint.connect()
                endpoint.get(conn, path)
                elapsed = time.perf_counter() - start
                conn.close()
                time.sleep(0.05)  # one new connection at a time, as separate kubectl commands make them
                return elapsed
            with profiled(pids if endpoint is ctx.tunnel else {}, args.py_spy, "dial"):
                return per_process_cpu(pids, one, args.dials)

        prepare_big_list(ctx)

        def lists(endpoint):
            with profiled(pids if endpoint is ctx.tunnel else {}, args.py_spy, "list"):
                results = []
                latencies, cpu = per_process_cpu(pids, lambda: results.append(big_list(ctx, endpoint)), args.lists)
            megabytes = statistics.mean(r["bytes"] for r in results) / 1e6
            return [r["bytes"] / r["seconds"] / 1e6 for r in results], {k: v / megabytes for k, v in cpu.items()}

        for name, measure, unit, scale in (("small GET", gets, "µs CPU per request", 1e6),
                                           ("dial", dials, "µs CPU per dial", 1e6),
                                           ("LIST", lists, "ms CPU per MB", 1e3)):
            tunnel, cpu = measure(ctx.tunnel)
            direct, _ = measure(ctx.direct)
            if name == "LIST":
                figures = f"MB/s median tunnel {statistics.median(tunnel):.0f}, direct {statistics.median(direct):.0f}"
            else:
                figures = (f"p50 tunnel {statistics.median(tunnel) * 1e3:.2f} ms, "
                           f"direct {statistics.median(direct) * 1e3:.2f} ms")
            digits = 1 if scale < 1e6 else 0
            per = ", ".join(f"{k} {v * scale:.{digits}f}" for k, v in cpu.items())
            print(f"{name}: {figures}; {unit}: {per}; total {sum(cpu.values()) * scale:.{digits}f}", flush=True)


if __name__ == "__main__":
    main()
