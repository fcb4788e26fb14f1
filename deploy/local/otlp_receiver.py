"""A minimal OTLP/gRPC trace receiver: the collector's TraceService (from the official opentelemetry-proto
definitions) on a loopback port, keeping every span it is sent. For the tests and the bench, which need
to see what the services export without running a collector; also runnable by hand:

    .venv/bin/python deploy/local/otlp_receiver.py --listen 127.0.0.1:4317

prints one line per span received (service, trace id, span id, parent, name) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    start_unix_nano: int
    attributes: dict[str, object] = field(default_factory=dict)


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("string_value", "int_value", "bool_value", "double_value") else None


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    found = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(ReceivedSpan(
                    service=str(resource.get("service.name", "")), trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(), name=span.name,
                    start_unix_nano=span.start_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in span.attributes},
                ))
    return found


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, on_spans: Callable[[list[ReceivedSpan]], None]) -> None:
        self.on_spans = on_spans

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.on_spans(spans_of(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Spans received so far (``spans()``), from a server on ``endpoint`` (host:port, plaintext)."""

    def __init__(self, port: int, on_spans: Callable[[list[ReceivedSpan]], None] | None = None) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._on_spans = on_spans
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self._received), self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.endpoint = f"127.0.0.1:{self.port}"

    def _received(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
        if self._on_spans is not None:
            self._on_spans(spans)

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def env(self, batch_delay_ms: int | None = 100) -> dict[str, str]:
        """The environment that points a service's exporter here; by default with a short batch delay (spans
        arrive within ~100 ms of ending), None for the SDK's own (5 s)."""
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{self.endpoint}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        if batch_delay_ms is not None:
            env["OTEL_BSP_SCHEDULE_DELAY"] = str(batch_delay_ms)
        return env


@contextmanager
def otlp_receiver(port: int = 0,
                  on_spans: Callable[[list[ReceivedSpan]], None] | None = None) -> Iterator[OtlpReceiver]:
    """A receiver on 127.0.0.1:``port`` (0: a free one) for the block's duration."""
    receiver = OtlpReceiver(port, on_spans)
    receiver.server.start()
    try:
        yield receiver
    finally:
        receiver.server.stop(grace=None).wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:4317", help="HOST:PORT; only 127.0.0.1 (default port 4317)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if host != "127.0.0.1" or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: expected 127.0.0.1:PORT")

    def show(spans: list[ReceivedSpan]) -> None:
        for span in spans:
            print(span.service, span.trace_id, span.span_id, span.parent_span_id or "-", span.name, flush=True)

    with otlp_receiver(int(port), show) as receiver:
        print(f"receiving OTLP/gRPC traces on {receiver.endpoint}", file=sys.stderr, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
