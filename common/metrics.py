"""What a service process reports about itself: Prometheus metrics, and the SIGUSR1 stats line, from the same readings.

One registry per process (``REGISTRY``). Two kinds of metric live on it:

- readings: a gauge or counter read at scrape time from a number the service keeps anyway (its open
  connections, its dials so far). ``gauge(...)``/``counter(...)`` register one; with ``stats=KEY`` the
  same callable also feeds the stats line (clusterconnect.service), so the two never disagree. A
  reading costs nothing on the data path: nothing happens until someone scrapes.
- labelled counters and histograms (dials by outcome, requests by verb and code), made with
  prometheus_client's own classes on ``REGISTRY`` by the service that counts them, once per
  connection or request (never per message).

Names follow Prometheus' rules: ``clusterconnect_<service>_<what>[_<unit>]``, ``_total`` for counters,
base units (seconds, bytes). Process metrics (``process_*``, ``python_*``) are prometheus_client's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# No *_created samples: start times of each label set are noise to a scraper of these few counters.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# The stats line's keys (name -> callable returning a number); some are readings too.
_stats: dict[str, Callable[[], int]] = {}


@dataclass(frozen=True)
class _Reading:
    name: str
    documentation: str
    counter: bool
    read: Callable[[], float]


class _Readings(Collector):
    """The readings, collected at scrape time."""

    def __init__(self) -> None:
        self.readings: dict[str, _Reading] = {}

    def collect(self) -> Iterable[Metric]:
        for reading in list(self.readings.values()):
            family: Metric
            if reading.counter:
                family = CounterMetricFamily(reading.name, reading.documentation, value=reading.read())
            else:
                family = GaugeMetricFamily(reading.name, reading.documentation, value=reading.read())
            yield family


_readings = _Readings()
REGISTRY.register(_readings)


def stat(key: str, read: Callable[[], int]) -> None:
    """A number for the stats line only (clusterconnect.service.register_gauge)."""
    _stats[key] = read


def stats() -> dict[str, int]:
    return {key: read() for key, read in _stats.items()}


def stats_value(key: str) -> int:
    """One key of the stats line now (0 if no service registered it)."""
    read = _stats.get(key)
    return read() if read is not None else 0


def _reading(name: str, documentation: str, counter: bool, read: Callable[[], int], stats: str | None) -> None:
    # A service that registers a reading again (a new session, a test's second server) replaces it.
    _readings.readings[name] = _Reading(name.removesuffix("_total") if counter else name, documentation, counter,
                                        read)
    if stats is not None:
        _stats[stats] = read


def gauge(name: str, documentation: str, read: Callable[[], int], stats: str | None = None) -> None:
    """A gauge read at scrape time; with ``stats``, also the stats line's value of that key."""
    _reading(name, documentation, False, read, stats)


def counter(name: str, documentation: str, read: Callable[[], int], stats: str | None = None) -> None:
    """A counter (``name`` ends in ``_total``) read at scrape time from a running total the service keeps."""
    if not name.endswith("_total"):
        raise ValueError(f"counter {name} must end in _total")
    _reading(name, documentation, True, read, stats)


def exposition() -> bytes:
    """The registry in Prometheus' text format (what /metrics answers)."""
    return generate_latest(REGISTRY)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in exposition ``text`` (for tests and tools): ``name`` with exactly ``labels``;
    None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None
