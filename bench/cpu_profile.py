"""CPU time each tunnel process spends per operation (and by which of its threads), read from /proc;
optionally py-spy profiles too.

    cpu_profile.py [--requests 2000] [--dials 200] [--lists 5] [--py-spy DIR] [--smoke] [--no-peer]

Through the tunnel: small GETs on one keep-alive connection, new connections (one GET each, 50 ms
apart), and LISTs (50 MiB; small with --smoke); prints the CPU of each process per request, per dial and per MB
(and how much of it the kernel spent for them), beside the latencies of direct access in the same run and
the same figures for Konnectivity's server and agent (the peer, bench/konnectivity.py; not with --no-peer), and
the CPU the apiserver and this load generator spend on the same operation, direct and through the tunnel:
on two shared cores, the tunnel gets what those two leave. With --py-spy, DIR gets one raw py-spy profile per
process and phase (`py-spy record -f raw`: one line per stack, count last). The per-hop figures
in docs/performance.md come from this script.
"""

from __future__ import annotations

import argparse
import os
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
from chain import cpu_times, machine_idle_total

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


def per_process_cpu(pids: dict[str, int], operation,
                    count: int) -> tuple[list[float], dict[str, tuple[float, float]], float]:
    """Run ``operation`` ``count`` times: its latencies, each process's (user, system) CPU seconds per
    operation, and the share of the machine's cores that were busy meanwhile."""
    before = {name: cpu_times([pid]) for name, pid in pids.items()}
    idle0, total0 = machine_idle_total()
    latencies = [operation() for _ in range(count)]
    idle1, total1 = machine_idle_total()
    after = {name: cpu_times([pid]) for name, pid in pids.items()}
    per_operation = {name: ((after[name][0] - before[name][0]) / count, (after[name][1] - before[name][1]) / count)
                     for name in pids}
    return latencies, per_operation, 1 - (idle1 - idle0) / max(total1 - total0, 1)


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU clock ticks of a process so far, by thread role: its event loop (the main thread), grpc core's
    threads (``event_engine``: HTTP/2, TLS and socket I/O) and the other threads (grpc.aio's poller, which
    hands core's completions to the loop, and any helper)."""
    ticks = {"event loop": 0, "grpc core": 0, "other threads": 0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm, open(f"/proc/{pid}/task/{tid}/stat") as stat:
                name, fields = comm.read().strip(), stat.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        role = ("event loop" if int(tid) == pid else
                "grpc core" if name.startswith(("event_engine", "grpc")) else "other threads")
        ticks[role] += int(fields[11]) + int(fields[12])
    return ticks


def thread_shares(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> str:
    """Each process's CPU between two thread_ticks snapshots, split by thread role in percent."""
    parts = []
    for name in before:
        used = {role: after[name][role] - before[name][role] for role in before[name]}
        total = max(sum(used.values()), 1)
        parts.append(f"{name} " + ", ".join(f"{role} {ticks / total:.0%}" for role, ticks in used.items()))
    return "; ".join(parts)


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
    parser.add_argument("--no-peer", action="store_true", help="without Konnectivity")
    args = parser.parse_args()
    with bench_setup(Sizes.smoke() if args.smoke else Sizes(), peer=not args.no_peer) as (ctx, _chain, _token):
        tunnel_pids = {name: ctx.pids[name] for name in SERVICES}
        peer_pids = {f"konnectivity-{name}": pid for name, pid in ctx.peer_pids.items()}
        # The apiserver's CPU is measured too: the same work either way, and the budget's other half.
        apiserver = {"apiserver": ctx.apiserver_pid} if ctx.apiserver_pid else {}
        pids = {**tunnel_pids, **peer_pids, **apiserver, "client": os.getpid()}
        path = "/api/v1/namespaces/default"

        def gets(endpoint):
            conn = endpoint.connect()
            for _ in range(50):
                endpoint.get(conn, path)
            with profiled(tunnel_pids if endpoint is ctx.tunnel else {}, args.py_spy, "get"):
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
            with profiled(tunnel_pids if endpoint is ctx.tunnel else {}, args.py_spy, "dial"):
                return per_process_cpu(pids, one, args.dials)

        prepare_big_list(ctx)

        def lists(endpoint):
            with profiled(tunnel_pids if endpoint is ctx.tunnel else {}, args.py_spy, "list"):
                results = []
                _, cpu, busy = per_process_cpu(pids, lambda: results.append(big_list(ctx, endpoint)), args.lists)
            megabytes = statistics.mean(r["bytes"] for r in results) / 1e6
            return ([r["bytes"] / r["seconds"] / 1e6 for r in results],
                    {k: (user / megabytes, system / megabytes) for k, (user, system) in cpu.items()}, busy)

        for name, measure, unit, scale in (("small GET", gets, "µs CPU per request", 1e6),
                                           ("dial", dials, "µs CPU per dial", 1e6),
                                           ("LIST", lists, "ms CPU per MB", 1e3)):
            threads = {k: thread_ticks(pid) for k, pid in tunnel_pids.items()}
            tunnel, cpu, busy = measure(ctx.tunnel)
            threads_line = thread_shares(threads, {k: thread_ticks(pid) for k, pid in tunnel_pids.items()})
            direct, direct_cpu, direct_busy = measure(ctx.direct)
            if name == "LIST":
                figures = f"MB/s median tunnel {statistics.median(tunnel):.0f}, direct {statistics.median(direct):.0f}"
            else:
                figures = (f"p50 tunnel {statistics.median(tunnel) * 1e3:.2f} ms, "
                           f"direct {statistics.median(direct) * 1e3:.2f} ms")
            digits = 1 if scale < 1e6 else 0

            def show(seconds: float, scale: float = scale, digits: int = digits) -> str:
                return f"{seconds * scale:.{digits}f}"

            per = ", ".join(f"{k} {show(sum(cpu[k]))}" for k in tunnel_pids)
            line = (f"{name}: {figures}; {unit}: {per}; total {show(sum(sum(cpu[k]) for k in tunnel_pids))}, "
                    f"of it kernel {show(sum(cpu[k][1] for k in tunnel_pids))}")
            for other in [*apiserver, "client"]:
                line += f"; {other} {show(sum(cpu[other]))} through the tunnel, {show(sum(direct_cpu[other]))} direct"
            line += f"; cores busy {busy:.0%} through the tunnel, {direct_busy:.0%} direct"
            if ctx.peer is not None:
                peer, peer_cpu, _ = measure(ctx.peer)
                peer_figure = (f"MB/s median {statistics.median(peer):.0f}" if name == "LIST"
                               else f"p50 {statistics.median(peer) * 1e3:.2f} ms")
                per_peer = ", ".join(f"{k.removeprefix('konnectivity-')} {show(sum(peer_cpu[k]))}" for k in peer_pids)
                line += (f"; Konnectivity: {peer_figure}; {unit}: {per_peer}; "
                         f"total {show(sum(sum(peer_cpu[k]) for k in peer_pids))}")
            print(line, flush=True)
            print(f"  {name}, the tunnel's CPU by thread: {threads_line}", flush=True)


if __name__ == "__main__":
    main()
