"""OpenTelemetry traces: one span per connection per hop, linked by W3C traceparent.

The trace context travels in gRPC metadata (`traceparent`) and, from relay to agent, in the
DialRequest. No exporter is configured by default; set OTEL_TRACES_EXPORTER=console to see spans.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

_tracer = trace.get_tracer("clusterconnect")


def configure_tracing(service: str) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": f"clusterconnect-{service}"}))
    if os.environ.get("OTEL_TRACES_EXPORTER") == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


@contextmanager
def connection_span(name: str, traceparent: str | None = None, **attributes: str) -> Iterator[str]:
    """A span for one connection at one hop; yields the traceparent to hand to the next hop."""
    parent = propagate.extract({"traceparent": traceparent}) if traceparent else None
    with _tracer.start_as_current_span(name, context=parent, attributes=attributes):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield carrier.get("traceparent", "")


def start_connection_span(name: str, **attributes: str) -> tuple[trace.Span, str]:
    """A span started now and ended by the caller (``span.end()`` or ``trace.use_span``), for a
    connection whose handler runs later; with the traceparent to hand to the next hop."""
    span = _tracer.start_span(name, attributes=attributes)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier.get("traceparent", "")
