"""Many streams at once through one agent: concurrency, big lists and head-of-line isolation."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import pytest
from chain import quiescent
from https_client import Endpoint
from kube import kubectl
from waiting import wait_until

NS = "tunnel-load"
BIG_ITEMS = 100
BIG_VALUE = 512 * 1024  # 100 x 512 KiB = 50 MiB list


@pytest.fixture(scope="module")
def loaded(chain, devcluster):
    devcluster.create_namespace(NS)
    items = [{"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": f"big-{i:03d}", "namespace": NS, "labels": {"size": "big"}},
              "data": {"v": f"{i:03d}" + "x" * (BIG_VALUE - 3)}} for i in range(BIG_ITEMS)]
    devcluster.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
                       timeout=300)
    return chain[1]


def _watch(endpoint: Endpoint, resource_version: str, expect: set[str], seen: dict[int, set[str]], index: int) -> None:
    conn = endpoint.connect(timeout=120)
    conn.request("GET", f"/api/v1/namespaces/{NS}/configmaps?watch=1&labelSelector=wave%3Dsmall"
                        f"&resourceVersion={resource_version}&timeoutSeconds=120", headers=endpoint.headers)
    response = conn.getresponse()
    assert response.status == 200
    mine = seen.setdefault(index, set())
    while not expect <= mine:
        line = response.readline()
        if not line:
            break
        event = json.loads(line)
        if event["type"] == "ADDED":
            mine.add(event["object"]["metadata"]["name"])
    conn.close()


def test_50_watches_and_a_50_mib_list_at_once(loaded, devcluster):
    endpoint = Endpoint(loaded)
    conn = endpoint.connect()
    listing = endpoint.get_json(conn, f"/api/v1/namespaces/{NS}/configmaps?limit=1")
    resource_version = listing["metadata"]["resourceVersion"]
    conn.close()
    names = {f"small-{i}" for i in range(5)}
    seen: dict[int, set[str]] = {}
    watchers = [threading.Thread(target=_watch, args=(endpoint, resource_version, names, seen, i), daemon=True)
                for i in range(50)]
    for watcher in watchers:
        watcher.start()
    listing: dict = {}

    def big_list() -> None:
        listing["result"] = kubectl(loaded, "get", "configmaps", "-n", NS, "-l", "size=big", "-o", "json", timeout=300)

    lister = threading.Thread(target=big_list, daemon=True)
    lister.start()
    for name in sorted(names):
        devcluster.kubectl("create", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NS, "labels": {"wave": "small"}}}))
    lister.join(300)
    for watcher in watchers:
        watcher.join(120)
    items = json.loads(listing["result"].stdout)["items"]
    assert len(items) == BIG_ITEMS
    assert all(item["data"]["v"] == f"{i:03d}" + "x" * (BIG_VALUE - 3) for i, item in enumerate(items))
    assert len(seen) == 50 and all(names <= s for s in seen.values()), {k: len(v) for k, v in seen.items()}


def _small_get_latencies(endpoint: Endpoint, count: int) -> list[float]:
    conn = endpoint.connect()
    samples = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            endpoint.get_json(conn, "/api/v1/namespaces/default")
            samples.append(time.perf_counter() - start)
    finally:
        conn.close()
    return samples


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def _probe_for(endpoint: Endpoint, seconds: float) -> list[float]:
    samples: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples += _small_get_latencies(endpoint, 50)
    return samples


def test_a_stalled_watch_does_not_slow_other_connections(loaded, chain, devcluster):
    """Head-of-line: one reader stops reading for 30 s while its stream is full; others keep their latency.

    Probes run for the same total time unloaded (half before, half after) as stalled, so rare events
    of the machine (GC, heartbeats, the apiserver's periodic work) weigh the same in both p99s.
    """
    endpoint = Endpoint(loaded)
    pids = [p.popen.pid for p in chain[0].processes.values() if p.alive()]  # other tests stop extra ones
    _small_get_latencies(endpoint, 50)  # warm up
    unloaded_samples = _probe_for(endpoint, 10)

    # A watch whose reader never reads: raw TLS socket, request sent, nothing read.
    tcp = socket.create_connection((endpoint.host, endpoint.port))
    raw = endpoint.ssl.wrap_socket(tcp, server_hostname=endpoint.host)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.sendall((f"GET /api/v1/namespaces/{NS}/configmaps?watch=1&timeoutSeconds=90 HTTP/1.1\r\n"
                 f"Host: {endpoint.host}\r\nAuthorization: {endpoint.headers['Authorization']}\r\n\r\n").encode())
    stalled_since = time.monotonic()
    try:
        # Fill every buffer on its path: ~20 MiB of events for a reader that does not read.
        for i in range(40):
            devcluster.kubectl("label", "configmap", f"big-{i:03d}", "-n", NS, f"round={i}", "--overwrite")
        # Measure once the stalled stream's buffers are full and the tunnel is idle again: while they
        # fill, the copying itself takes CPU from the probe on this 2-core machine.
        wait_until(lambda: quiescent(pids), 30, "the stalled stream's buffers to fill")
        # At least 20 s of probes, and the reader stalled for at least 30 s in all.
        stalled_samples = _probe_for(endpoint, max(20.0, 30 - (time.monotonic() - stalled_since)))
    finally:
        raw.close()
    unloaded_samples += _probe_for(endpoint, 10)
    unloaded, stalled = _p99(unloaded_samples), _p99(stalled_samples)
    print(f"small GET p99 unloaded {unloaded * 1e3:.2f} ms ({len(unloaded_samples)} requests), "
          f"with a stalled watch {stalled * 1e3:.2f} ms ({len(stalled_samples)} requests)")
    assert stalled <= 2 * unloaded, (unloaded, stalled)
