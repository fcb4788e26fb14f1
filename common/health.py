"""Is this process ready to serve? Readiness checks, told to HTTP probes (/readyz) and to grpc.health.v1.

A service registers what it depends on (``check(name, probe)``: the relay's store, the agent's control
stream, the auth proxy's apiserver) and calls ``serving()`` once its servers listen. It is ready when
it is serving and every check passes; a failed check says why in one line. Liveness (/healthz) is only
"the event loop answers": a process that is alive but not ready must not be restarted for it (a relay
waiting for etcd would then never wait long enough).

Every gRPC server a service runs gets the standard health service (``add_to_server``); its overall
status ("") follows the same readiness, re-evaluated every ``GRPC_STATUS_INTERVAL`` seconds by
``keep_grpc_status`` (in the service's TaskGroup, clusterconnect.service).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# One readiness probe: None when the dependency is fine, else why not (one line, no secret).
Probe = Callable[[], Awaitable[str | None]]

# A check that has not answered by then counts as failed (a hung store must not hang the probe).
CHECK_TIMEOUT = 3.0
GRPC_STATUS_INTERVAL = 5.0

_checks: dict[str, Probe] = {}
_serving = [False]
_servicers: list[health.aio.HealthServicer] = []
# Set when a server or ``serving()`` came along: the gRPC status is told at once, not an interval later.
_news = asyncio.Event()


def check(name: str, probe: Probe) -> None:
    """Make readiness depend on ``probe`` (a later check of the same name replaces it)."""
    _checks[name] = probe


def serving() -> None:
    """The service's servers listen: from now on, readiness is the checks'."""
    _serving[0] = True
    _news.set()


async def _run(name: str, probe: Probe) -> str | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            problem = await probe()
    except TimeoutError:
        problem = f"no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:  # a probe's failure is a readiness answer, never the service's end
        problem = " ".join((str(exc) or type(exc).__name__).split())[:300]
    return None if problem is None else f"{name}: {problem}"


async def problems() -> list[str]:
    """Why the service is not ready (empty: ready). The checks run together, each with its deadline."""
    if not _serving[0]:
        return ["starting"]
    answers = await asyncio.gather(*(_run(name, probe) for name, probe in list(_checks.items())))
    return [answer for answer in answers if answer is not None]


def add_to_server(server: grpc.aio.Server) -> None:
    """grpc.health.v1.Health on ``server``; NOT_SERVING until the first readiness answer says otherwise."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    _servicers.append(servicer)
    _news.set()


async def _set_grpc_status(ready: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
    for servicer in _servicers:
        await servicer.set("", status)


async def keep_grpc_status(interval: float = GRPC_STATUS_INTERVAL) -> None:
    """Keep every gRPC health service's status on the readiness (until cancelled)."""
    while True:
        _news.clear()
        if _servicers:
            await _set_grpc_status(not await problems())
        try:
            async with asyncio.timeout(interval):
                await _news.wait()
        except TimeoutError:
            pass
