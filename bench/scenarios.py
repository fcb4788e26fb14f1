"""The benchmark scenarios. Each measures one endpoint (direct or tunnel) and returns plain data."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11
from chain import StartFailed, machine_idle_total, port_open, quiescent, service_stats
from endpoints import Endpoint
from waiting import wait_until
from workloads import SINK_SERVER

KUBECTL = "/usr/bin/kubectl"


@dataclass
class Sizes:
    get_requests: int = 2000
    list_items: int = 100
    list_item_bytes: int = 512 * 1024
    forward_bytes: int = 1024 * 1024 * 1024
    dials: int = 300
    watches: int = 1000
    watch_events: int = 20
    stalled_readers: int = 10
    hol_probe_requests: int = 500
    scale_agents: tuple[int, ...] = (1000, 10000)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(get_requests=20, list_items=2, list_item_bytes=16 * 1024, forward_bytes=1024 * 1024, dials=5,
                   watches=5, watch_events=2, stalled_readers=2, hol_probe_requests=20, scale_agents=(5,))


@dataclass
class Context:
    direct: Endpoint
    tunnel: Endpoint
    admin_kubeconfig: Path
    kubeconfigs: dict[str, Path]  # endpoint name -> kubeconfig for kubectl
    namespace: str
    sizes: Sizes
    work_dir: Path
    pids: dict[str, int] = field(default_factory=dict)  # tunnel processes, for RSS
    logs: dict[str, Path] = field(default_factory=dict)  # their logs, for their stats lines
    apiserver_pid: int | None = None  # the devcluster's kube-apiserver, for its CPU time
    peer: Endpoint | None = None  # Konnectivity, the peer measured beside us (bench/konnectivity.py)
    peer_pids: dict[str, int] = field(default_factory=dict)  # its server and agent
    gateway: Endpoint | None = None  # the same tunnel entered through clusterconnect-gateway (no client proxy)
    gateway_pids: dict[str, int] = field(default_factory=dict)  # relay, agent, aadproxy and gateway
    # A second chain, traced over OTLP and scraped (bench/observed.py): small GETs alternating with the tunnel's.
    observed: Endpoint | None = None
    observed_pids: dict[str, int] = field(default_factory=dict)

    def endpoints(self) -> list[Endpoint]:
        # Not the observed chain: it is measured against the tunnel request by request (bench/observed.py).
        return [e for e in (self.direct, self.tunnel, self.gateway, self.peer) if e is not None]

    def pids_of(self, endpoint: Endpoint) -> dict[str, int]:
        """The processes of ``endpoint``'s tunnel (none for direct access)."""
        by_name = {"tunnel": self.pids, "gateway": self.gateway_pids, "konnectivity": self.peer_pids,
                   "observed": self.observed_pids}
        return by_name.get(endpoint.name, {})


def kubectl(kubeconfig: Path, *args: str, input: str | None = None, timeout: float = 600) -> str:
    result = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], input=input, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def memory_detail(pid: int) -> dict[str, int]:
    """Where a process's RSS is (/proc/PID/smaps_rollup, MiB): anonymous (heaps) vs file-backed
    (shared libraries, the same in every process), and its thread count.

    Also asks the process for its stats line (SIGUSR1: open connections ...) in its own log, which
    tells whether the previous round's connections are still open."""
    kib: dict[str, int] = {}
    try:
        os.kill(pid, signal.SIGUSR1)
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    kib[parts[0].rstrip(":")] = int(parts[1])
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return {}
    return {"rss": kib.get("Rss", 0) // 1024, "anonymous": kib.get("Anonymous", 0) // 1024,
            "file": (kib.get("Rss", 0) - kib.get("Anonymous", 0)) // 1024, "threads": threads}


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- 1. small GET latency on a keep-alive connection ------------------------------------------------

SMALL_GET_PATH = "/api/v1/namespaces/default"


def small_get(ctx: Context, endpoint: Endpoint) -> dict:
    conn = endpoint.connect()
    try:
        for _ in range(20):
            endpoint.get(conn, SMALL_GET_PATH)
        samples = []
        for _ in range(ctx.sizes.get_requests):
            start = time.perf_counter()
            endpoint.get(conn, SMALL_GET_PATH)
            samples.append(time.perf_counter() - start)
    finally:
        conn.close()
    return {"latencies": samples}


# -- 2. a big LIST ------------------------------------------------------------------------------------

def prepare_big_list(ctx: Context) -> None:
    items = [{"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": f"big-{i:04d}", "namespace": ctx.namespace, "labels": {"bench": "big"}},
              "data": {"v": "x" * ctx.sizes.list_item_bytes}} for i in range(ctx.sizes.list_items)]
    kubectl(ctx.admin_kubeconfig, "apply", "--server-side", "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def big_list(ctx: Context, endpoint: Endpoint) -> dict:
    conn = endpoint.connect()
    try:
        start = time.perf_counter()
        body = endpoint.get(conn, f"/api/v1/namespaces/{ctx.namespace}/configmaps?labelSelector=bench%3Dbig")
        seconds = time.perf_counter() - start
    finally:
        conn.close()
    assert len(json.loads(body)["items"]) == ctx.sizes.list_items
    return {"seconds": seconds, "bytes": len(body)}


# -- 3. port-forward bulk transfer --------------------------------------------------------------------

def prepare_sink(ctx: Context) -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sink", "namespace": ctx.namespace},
           "spec": {"terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "sink", "image": "local",
                                    "command": [sys.executable, "-c", SINK_SERVER, str(port)]}]}}
    kubectl(ctx.admin_kubeconfig, "delete", "pod", "sink", "-n", ctx.namespace, "--ignore-not-found", "--wait=true")
    kubectl(ctx.admin_kubeconfig, "apply", "-f", "-", input=json.dumps(pod))
    kubectl(ctx.admin_kubeconfig, "wait", "--for=condition=Ready", "pod/sink", "-n", ctx.namespace, "--timeout=60s")
    wait_until(lambda: port_open(port), 20, f"the sink pod to listen on port {port}")
    return port


def port_forward(ctx: Context, endpoint: Endpoint, pod_port: int, websockets: bool = True) -> dict:
    process = subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(ctx.kubeconfigs[endpoint.name]), "port-forward", "-n", ctx.namespace,
         "pod/sink", f":{pod_port}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "KUBECTL_PORT_FORWARD_WEBSOCKETS": "true" if websockets else "false"},
        start_new_session=True)
    try:
        line = process.stdout.readline()
        local = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        block = os.urandom(1 << 20)
        size = ctx.sizes.forward_bytes
        with socket.create_connection(("127.0.0.1", local)) as sock:
            start = time.perf_counter()
            sent = 0
            while sent < size:
                piece = block[: min(len(block), size - sent)]
                sock.sendall(piece)
                sent += len(piece)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < 8:
                data = sock.recv(8 - len(answer))
                if not data:
                    break
                answer += data
            seconds = time.perf_counter() - start
        assert int.from_bytes(answer, "big") == size, answer
        return {"seconds": seconds, "bytes": size}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


# -- 4. dial: TCP connect until the first response byte ------------------------------------------------

def dial(ctx: Context, endpoint: Endpoint) -> dict:
    context = endpoint.ssl_context()
    request = (f"GET /version HTTP/1.1\r\nHost: {endpoint.host}\r\nAuthorization: Bearer {endpoint.token}\r\n"
               "Connection: close\r\n\r\n").encode()
    samples = []
    for _ in range(ctx.sizes.dials):
        start = time.perf_counter()
        with endpoint.open_socket() as raw:
            with context.wrap_socket(raw, server_hostname=endpoint.tls_name) as tls:
                tls.sendall(request)
                tls.recv(1)
                samples.append(time.perf_counter() - start)
                while tls.recv(65536):
                    pass
    return {"latencies": samples}


# -- 5. many watches through one agent ----------------------------------------------------------------

async def _watch(endpoint: Endpoint, context: ssl.SSLContext, path: str, latencies: list[float],
                 established: asyncio.Event, counter: list[int], total: int, done: asyncio.Event) -> None:
    sock = await asyncio.to_thread(endpoint.open_socket)
    reader, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname=endpoint.tls_name)
    conn = h11.Connection(h11.CLIENT)
    writer.write(conn.send(h11.Request(method="GET", target=path, headers=[
        ("Host", endpoint.host), ("Authorization", f"Bearer {endpoint.token}"), ("Accept", "application/json")])))
    writer.write(conn.send(h11.EndOfMessage()))
    buffer = b""
    try:
        while not done.is_set():
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                counter[0] += 1
                if counter[0] == total:
                    established.set()
            elif isinstance(event, h11.Data):
                buffer += event.data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    received = time.time()
                    sent = json.loads(line)["object"]["metadata"].get("annotations", {}).get("bench/sent")
                    if sent:
                        latencies.append(received - float(sent))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return
    finally:
        # At once, not a TLS shutdown that asyncio.run() may cut short, leaving the socket open
        # until garbage collection (and the connection open through the tunnel into the next round).
        writer.transport.abort()


def _send_ticks(ctx: Context) -> None:
    """Patch the watched object directly (one keep-alive connection), stamping the send time."""
    conn = ctx.direct.connect()
    try:
        for _ in range(ctx.sizes.watch_events):
            body = json.dumps({"metadata": {"annotations": {"bench/sent": repr(time.time())}}})
            conn.request("PATCH", f"/api/v1/namespaces/{ctx.namespace}/configmaps/tick", body=body,
                         headers={**ctx.direct.headers, "Content-Type": "application/merge-patch+json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            time.sleep(0.1)  # spacing between events, not synchronisation
    finally:
        conn.close()


async def _watches(ctx: Context, endpoint: Endpoint) -> dict:
    context = endpoint.ssl_context()
    await asyncio.to_thread(subprocess.run, [KUBECTL, "--kubeconfig", str(ctx.admin_kubeconfig), "create",
                                             "configmap", "tick", "-n", ctx.namespace], capture_output=True)
    path = (f"/api/v1/namespaces/{ctx.namespace}/configmaps"
            "?watch=1&fieldSelector=metadata.name%3Dtick&timeoutSeconds=300")
    latencies: list[float] = []
    established, done = asyncio.Event(), asyncio.Event()
    counter = [0]
    n = ctx.sizes.watches
    if endpoint.name == "tunnel":
        before = {name: memory_detail(pid) for name, pid in ctx.pids.items()}
        print(f"[watches] memory (MiB) before opening the watches: {json.dumps(before)}", flush=True)
    async with asyncio.TaskGroup() as group:
        tasks = []
        for i in range(n):
            tasks.append(group.create_task(_watch(endpoint, context, path, latencies, established, counter, n, done)))
            if i % 50 == 49:
                await asyncio.sleep(0)
        await asyncio.wait_for(established.wait(), 300)
        await asyncio.sleep(1)  # the initial ADDED events settle
        latencies.clear()
        rss = {name: rss_mib(pid) for name, pid in ctx.pids_of(endpoint).items()}
        detail = {name: memory_detail(pid) for name, pid in ctx.pids_of(endpoint).items()}
        if detail:
            print(f"[watches] memory (MiB) while {n} watches are open: {json.dumps(detail)}", flush=True)
            # BENCH_WATCH_HOLD=seconds keeps the watches open for inspecting the processes by hand.
            await asyncio.sleep(float(os.environ.get("BENCH_WATCH_HOLD", "0")))
        await asyncio.to_thread(_send_ticks, ctx)
        deadline = time.monotonic() + 60
        expected = n * ctx.sizes.watch_events
        while len(latencies) < expected and time.monotonic() < deadline:  # noqa: ASYNC110 -- a count, no event
            await asyncio.sleep(0.1)
        done.set()
        for task in tasks:
            task.cancel()
    return {"latencies": latencies, "expected": n * ctx.sizes.watch_events, "rss_mib": rss, "memory": detail}


def watches(ctx: Context, endpoint: Endpoint) -> dict:
    result = asyncio.run(_watches(ctx, endpoint))
    if endpoint.name in ("tunnel", "gateway"):
        # The next round measures its own 1,000 watches, not these too: a client that hung up leaves
        # its response up to the auth proxy's EOF grace (10 s) before the tunnel lets go.
        wait_drained(ctx, 60, ctx.pids_of(endpoint))
    return result


def open_connections(log: Path, pid: int) -> int | None:
    """A service's open connections from a fresh stats line; None if it does not answer."""
    try:
        return service_stats(log, pid).get("open_connections", 0)
    except StartFailed:
        return None


def wait_drained(ctx: Context, timeout: float, pids: dict[str, int] | None = None) -> None:
    """Until no tunnel process (of ``pids``, default the client proxy's path) has an open connection (or
    the timeout: then say so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = {name: open_connections(ctx.logs[name], pid) for name, pid in (pids or ctx.pids).items()}
        if all(count == 0 for count in counts.values()):
            return
        time.sleep(0.5)  # polling the services' gauges
    print(f"[bench] tunnel still has open connections after {timeout:g}s: {counts}", flush=True)


# -- 6. head-of-line isolation -------------------------------------------------------------------------

def _machine_idle(window: float = 1.0) -> bool:
    """True when both cores were at least 80% idle over ``window`` seconds."""
    idle0, total0 = machine_idle_total()
    time.sleep(window)  # a measuring interval, not synchronisation
    idle1, total1 = machine_idle_total()
    return (idle1 - idle0) >= 0.8 * (total1 - total0)


HOL_TIMEOUT = 10.0  # s: a healthy tunnel opens a connection in ~10 ms; 1,000× that is blocked, not slow


def head_of_line(ctx: Context, endpoint: Endpoint) -> dict:
    """The probe's latency unloaded and with stalled readers open; ``blocked`` says where it stopped when a
    stalled reader holds up every connection (Konnectivity's one shared stream per agent does)."""
    def probe() -> list[float]:
        conn = endpoint.connect(timeout=HOL_TIMEOUT)
        samples = []
        try:
            for _ in range(ctx.sizes.hol_probe_requests):
                start = time.perf_counter()
                endpoint.get(conn, "/api/v1/namespaces/default")
                samples.append(time.perf_counter() - start)
        finally:
            conn.close()
        return samples

    unloaded = probe()
    stalled: list[socket.socket] = []
    request = (f"GET /api/v1/namespaces/{ctx.namespace}/configmaps?watch=1&labelSelector=bench%3Dbig&timeoutSeconds=120"
               f" HTTP/1.1\r\nHost: {endpoint.host}\r\nAuthorization: Bearer {endpoint.token}\r\n\r\n").encode()
    context = endpoint.ssl_context()
    try:
        for number in range(1, ctx.sizes.stalled_readers + 1):
            try:
                raw = endpoint.open_socket(HOL_TIMEOUT)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                tls = context.wrap_socket(raw, server_hostname=endpoint.tls_name)
                tls.sendall(request)  # the initial list of big objects fills every buffer; nobody reads it
            except OSError as exc:  # socket.timeout included
                return {"unloaded": unloaded, "loaded": [],
                        "blocked": f"stalled reader {number} of {ctx.sizes.stalled_readers} could not connect"
                                   f" within {HOL_TIMEOUT:.0f} s ({exc or type(exc).__name__})"}
            stalled.append(tls)
        # Probe once the stalled streams' buffers are full and the copying has stopped: while they
        # fill, the copying takes CPU from the probe on a 2-core machine (that is load, not
        # head-of-line blocking). The tunnel's processes, or the whole machine for direct access.
        pids = list(ctx.pids_of(endpoint).values())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (quiescent(pids) if pids else _machine_idle()):
            pass
        try:
            loaded = probe()
        except OSError as exc:
            return {"unloaded": unloaded, "loaded": [],
                    "blocked": f"the probe got no answer within {HOL_TIMEOUT:.0f} s with"
                               f" {len(stalled)} stalled readers ({exc or type(exc).__name__})"}
    finally:
        for tls in stalled:
            tls.close()
    return {"unloaded": unloaded, "loaded": loaded}
