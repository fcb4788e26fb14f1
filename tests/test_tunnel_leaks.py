"""After 1,000 connections opened and closed, no task, gRPC call or file descriptor is left in any process."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from chain import Process, wait_until
from https_client import Endpoint

SERVICES = ("proxy", "relay", "agent", "aadproxy")
# Timers and keepalive pings come and go; a leak of 1,000 connections would be far above this.
SLACK = 3


def _settled(processes: dict[str, Process], baseline: dict[str, dict]) -> dict | bool:
    now = {name: processes[name].stats() for name in SERVICES}
    ok = all(
        now[name].get("open_connections", 0) == 0
        and now[name]["tasks"] <= baseline[name]["tasks"] + SLACK
        and now[name]["fds"] <= baseline[name]["fds"] + SLACK
        for name in SERVICES
    )
    return now if ok else False


def test_1000_connections_leave_nothing_behind(chain):
    tunnel, kubeconfig = chain
    endpoint = Endpoint(kubeconfig)
    assert endpoint.one_request() == 200
    def idle() -> dict | bool:
        now = {name: tunnel.processes[name].stats() for name in SERVICES}
        return now if all(v.get("open_connections", 0) == 0 for v in now.values()) else False

    baseline = wait_until(idle, 30, "the first connection to wind down", interval=0.2)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: endpoint.one_request(), range(1000)))
    assert statuses.count(200) == 1000
    # Connections wind down asynchronously after the client hangs up; wait for every gauge to return.
    final = wait_until(lambda: _settled(tunnel.processes, baseline), 30, "every process to return to its baseline",
                       interval=0.5)
    print(json.dumps({"baseline": baseline, "after": final}, default=str)[:2000])
