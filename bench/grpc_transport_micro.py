"""One grpc.aio hop alone, over loopback TCP, TCP with TLS, and a Unix domain socket: what TLS costs a
hop, and the lever "the agent ↔ auth proxy channel on a Unix domain socket when they share a pod"
(issue #15), measured before it is built.

    grpc_transport_micro.py [--round-trips 5000] [--size 1024]

A server process per transport echoes each message of a raw bidi stream (as the relay's Accept carries
Chunks); this process sends one, waits for its echo, and so on, on one stream per transport, each
transport in turn and then all again (so that a noisy minute weighs on all). Prints the median round
trip and the CPU (user + system, both processes, from /proc) per round trip. The services' gRPC options
(clusterconnect.grpc_options) and uvloop, as in the services; TLS with a P-256 certificate, as the relay's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop

from clusterconnect.grpc_options import CHANNEL_OPTIONS, SERVER_OPTIONS
from clusterconnect.pki import create_ca, issue_server_cert, write_private

METHOD = "/bench.Echo/Echo"
TICKS = os.sysconf("SC_CLK_TCK")


async def serve(address: str, tls: Path | None) -> None:
    async def echo(requests: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            await context.write(message)

    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(echo)})])
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        pair = ((tls / "server.key").read_bytes(), (tls / "server.crt").read_bytes())
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    if not bound:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    print(f"ready {bound}", flush=True)  # the port the kernel gave "127.0.0.1:0"
    await server.wait_for_termination()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads: grpc's poller too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def open_channel(address: str, tls: Path | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=(tls / "ca.crt").read_bytes())
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


async def ping_pong(address: str, tls: Path | None, round_trips: int, size: int,
                    server_pid: int) -> tuple[float, float]:
    """(median round trip in µs, CPU of both processes per round trip in µs) on one stream."""
    async with open_channel(address, tls) as channel:
        call = channel.stream_stream(METHOD)()
        message = b"x" * size
        for _ in range(200):  # warm-up: connection, stream, allocator
            await call.write(message)
            await call.read()
        times = []
        cpu_before = cpu_seconds(os.getpid()) + cpu_seconds(server_pid)
        for _ in range(round_trips):
            started = time.perf_counter()
            await call.write(message)
            await call.read()
            times.append(time.perf_counter() - started)
        cpu = cpu_seconds(os.getpid()) + cpu_seconds(server_pid) - cpu_before
        await call.done_writing()
        await call.code()
    return statistics.median(times) * 1e6, cpu / round_trips * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--size", type=int, default=1024, help="bytes per message")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--tls", type=Path, help=argparse.SUPPRESS)  # its certificate and key
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve, args.tls))
        return
    with tempfile.TemporaryDirectory() as scratch:
        pki = Path(scratch)
        ca = create_ca("grpc_transport_micro CA")
        pair = issue_server_cert(ca, ["localhost", "127.0.0.1"])
        (pki / "ca.crt").write_bytes(ca.cert_pem)
        (pki / "server.crt").write_bytes(pair.cert_pem)
        write_private(pki / "server.key", pair.key_pem)
        transports = {"tcp": "127.0.0.1:0", "tcp+tls": "127.0.0.1:0", "unix": f"unix:{scratch}/echo.sock"}
        tls = {"tcp": None, "tcp+tls": pki, "unix": None}
        servers: dict[str, subprocess.Popen[str]] = {}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in transports}
        try:
            for name, address in transports.items():
                servers[name] = subprocess.Popen(
                    [sys.executable, __file__, "--serve", address, *(["--tls", str(pki)] if tls[name] else [])],
                    stdout=subprocess.PIPE, text=True)
                assert servers[name].stdout is not None
                ready, _, port = servers[name].stdout.readline().partition(" ")
                if ready != "ready":
                    raise SystemExit(f"echo server on {address} did not start")
                if name.startswith("tcp"):
                    transports[name] = f"127.0.0.1:{port.strip()}"
            for _ in range(2):
                for name, address in transports.items():
                    results[name].append(uvloop.run(ping_pong(address, tls[name], args.round_trips,
                                                              args.size, servers[name].pid)))
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(10)
    for name, runs in results.items():
        figures = ", ".join(f"{latency:.0f} µs p50, {cpu:.0f} µs CPU" for latency, cpu in runs)
        print(f"{name}: {args.round_trips} round trips of {args.size} B, per round trip: {figures}")


if __name__ == "__main__":
    main()
