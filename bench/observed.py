"""The "observed" endpoint (issue #14): a second chain beside the plain one, the same processes with every
service's traces exported over OTLP/gRPC (to a receiver in this process, deploy/local/otlp_receiver.py;
the SDK's default batching) and its /metrics scraped every second, harder than Prometheus' usual 15-60 s.
A small GET goes through each in turn, request by request on one keep-alive connection each (who goes first
alternates), so both see the same moment of a shared machine and the report shows what observing the chain
costs side by side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chain import Chain, Process
from endpoints import Endpoint
from otlp_receiver import OtlpReceiver, otlp_receiver
from scenarios import SMALL_GET_PATH, Context

SCRAPE_INTERVAL = 1.0  # seconds
SERVICES = ("relay", "agent", "aadproxy", "proxy")


@dataclass
class Scraper:
    """GET /metrics of each process every ``interval`` seconds, on a thread of its own, until stopped."""

    processes: list[Process]
    interval: float = SCRAPE_INTERVAL
    scrapes: int = 0
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for process in self.processes:
                try:
                    process.metrics()
                    self.scrapes += 1
                except (OSError, RuntimeError):  # counted: a scrape that fails costs the services nothing
                    self.failures += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


@dataclass
class Observed:
    chain: Chain
    kubeconfig: Path
    receiver: OtlpReceiver
    scraper: Scraper

    def summary(self) -> dict:
        return {"spans_received": len(self.receiver.spans()), "scrapes": self.scraper.scrapes,
                "scrape_failures": self.scraper.failures, "scrape_interval_seconds": self.scraper.interval}


@contextmanager
def observed_chain(work: Path, cluster_kubeconfig: Path, token_file: Path) -> Iterator[Observed]:
    """relay + agent + auth proxy + client proxy exporting traces and scraped; stopped on the way out."""
    with otlp_receiver() as receiver:
        chain = Chain(work / "observed-chain", cluster_kubeconfig, env=receiver.env(batch_delay_ms=None))
        scraper = Scraper([])
        try:
            kubeconfig = work / "observed.kubeconfig"
            chain.start_all(token_file, kubeconfig)
            scraper.processes = [chain.processes[name] for name in SERVICES]
            scraper.start()
            yield Observed(chain, kubeconfig, receiver, scraper)
        finally:
            scraper.stop()
            chain.stop_all()


def paired_small_get(ctx: Context, plain: Endpoint, observed: Endpoint) -> dict:
    """small_get's requests through both chains, interleaved; latencies of each."""
    connections = {"plain": plain.connect(), "observed": observed.connect()}
    endpoints = {"plain": plain, "observed": observed}
    samples: dict[str, list[float]] = {"plain": [], "observed": []}
    try:
        for name, conn in connections.items():
            for _ in range(20):
                endpoints[name].get(conn, SMALL_GET_PATH)
        for i in range(ctx.sizes.get_requests):
            for name in (("plain", "observed") if i % 2 == 0 else ("observed", "plain")):
                start = time.perf_counter()
                endpoints[name].get(connections[name], SMALL_GET_PATH)
                samples[name].append(time.perf_counter() - start)
    finally:
        for conn in connections.values():
            conn.close()
    return {"plain": samples["plain"], "observed": samples["observed"]}
