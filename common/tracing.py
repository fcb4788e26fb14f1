"""OpenTelemetry traces: one span per connection per hop, linked by W3C traceparent.

The trace context travels in gRPC metadata (`traceparent`) and, from relay to agent, in the
DialRequest. Where spans go is the standard OTEL_* environment's (docs/tracing.md):
OTEL_TRACES_EXPORTER (``otlp``, ``console``, ``none``, or a comma-separated list), and for OTLP the
OTEL_EXPORTER_OTLP_* variables, which the exporter reads itself. An OTLP endpoint set without
OTEL_TRACES_EXPORTER means ``otlp``; nothing set means no exporter (spans are made and dropped).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

from clusterconnect.errors import StartupError

_tracer = trace.get_tracer("clusterconnect")

EXPORTERS = ("otlp", "console", "none")
# On a graceful stop, spans still queued get this long to leave (a collector that does not answer must
# not hold the stop up: Kubernetes' grace period is the whole stop's).
FLUSH_ON_STOP_SECONDS = 3.0

_provider: TracerProvider | None = None


def exporter_names(environ: os._Environ[str] | dict[str, str] = os.environ) -> list[str]:
    """The exporters the environment asks for, in order; raises StartupError for a name we do not know."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    asked = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not asked:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [name.strip() for name in asked.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise StartupError(f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r} (known: {', '.join(EXPORTERS)})")
    return [name for name in dict.fromkeys(names) if name != "none"]


def _processor(name: str) -> SpanProcessor:
    if name == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter())
    # Imported only when asked for: it brings grpc's exporter machinery into every process otherwise.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # The exporter reads OTEL_EXPORTER_OTLP_{,TRACES_}{ENDPOINT,INSECURE,HEADERS,TIMEOUT,COMPRESSION,
    # CERTIFICATE,...}; the batch processor OTEL_BSP_*. Its export runs on the processor's own thread:
    # the event loop only appends a finished span to a queue (full: the span is dropped, never waited on).
    return BatchSpanProcessor(OTLPSpanExporter())


def configure_tracing(service: str) -> None:
    """The process's tracer provider, named ``clusterconnect-SERVICE`` unless OTEL_SERVICE_NAME says otherwise
    (OTEL_RESOURCE_ATTRIBUTES adds attributes); raises StartupError for an unknown exporter name."""
    global _provider
    names = exporter_names()
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"clusterconnect-{service}"}
    # The SDK's own atexit hook (shutdown_on_exit) is a second chance; shutdown_tracing() is the first.
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        provider.add_span_processor(_processor(name))
    trace.set_tracer_provider(provider)
    _provider = provider


def shutdown_tracing(timeout: float = FLUSH_ON_STOP_SECONDS) -> bool:
    """Send the spans still queued and stop exporting, waiting at most ``timeout`` seconds: the stop path's
    last step. False if the exporter was still busy then (the process exits all the same)."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return True
    # The SDK's shutdown sends what is queued, but its wait is the exporter's whole retry budget
    # (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s) and force_flush takes no deadline: a thread of its own bounds it.
    stopper = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    stopper.start()
    stopper.join(timeout)
    return not stopper.is_alive()


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


def request_span(name: str, **attributes: str | int) -> trace.Span:
    """A span for one request inside the current connection's span, ended by the caller (``end_request_span``)."""
    return _tracer.start_span(name, attributes=attributes, kind=trace.SpanKind.SERVER)


def end_request_span(span: trace.Span, status: int) -> None:
    """Record the HTTP status the client got (0: none, the connection broke first) and end the span; a 5xx or
    no answer is an error (a 4xx is the client's, not ours: OpenTelemetry's HTTP server convention)."""
    if status:
        span.set_attribute("http.response.status_code", status)
    if status == 0 or status >= 500:
        span.set_status(trace.StatusCode.ERROR)
    span.end()


def current_span() -> trace.Span:
    """The span of the code running now (a non-recording one outside any)."""
    return trace.get_current_span()
