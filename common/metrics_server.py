"""The metrics port (``--metrics-listen HOST:PORT``): /metrics, /healthz and /readyz over plain HTTP.

Its own listening socket, off the data path: a scrape or a probe never shares a connection, a task or
a queue with tunnelled traffic. Plain HTTP, one request per connection (``Connection: close``), parsed
by h11: Prometheus and the kubelet need no more. What it serves holds no secret (counts, names of
states); a port given a non-loopback host is for the pod network (probes, Prometheus), so the
defaults are loopback (README "Default ports").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from http import HTTPStatus

import h11

from clusterconnect import health, metrics
from clusterconnect.errors import StartupError
from clusterconnect.logs import get_logger

log = get_logger(__name__)

# A client that has not sent its request head by then is dropped (a scraper sends it at once).
REQUEST_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024
# prometheus_client's content type for text format 0.0.4.
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def parse_listen(value: str, flag: str = "--metrics-listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); a one-line StartupError otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StartupError(f"{flag} must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def _answer(method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
    """(status, content type, body) for one request."""
    path = target.split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return 405, b"text/plain", b"only GET\n"
    if path == b"/metrics":
        return 200, METRICS_TYPE, metrics.exposition()
    if path in (b"/healthz", b"/livez"):
        return 200, b"text/plain", b"ok\n"
    if path == b"/readyz":
        problems = await health.problems()
        if problems:
            return 503, b"text/plain", ("not ready: " + "; ".join(problems) + "\n").encode()
        return 200, b"text/plain", b"ok\n"
    return 404, b"text/plain", b"not found: /metrics, /healthz, /readyz\n"


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(MAX_HEAD))
                    continue
                break
        if type(event) is not h11.Request:
            return  # the client closed without a request
        status, content_type, body = await _answer(event.method, event.target)
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase))
        if event.method != b"HEAD":
            data += conn.send(h11.Data(data=body))
        writer.write(data + conn.send(h11.EndOfMessage()))
        await writer.drain()
    except (h11.ProtocolError, TimeoutError, OSError):
        pass  # a bad or slow client: its connection only
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class MetricsServer:
    """The port, bound by ``open`` (before the service starts its work, so a taken port is a StartupError)
    and served by ``serve`` in the service's TaskGroup; each request runs in serve()'s own TaskGroup."""

    def __init__(self, server: asyncio.Server, address: str) -> None:
        self.server = server
        self.address = address
        self._requests: asyncio.TaskGroup | None = None

    @classmethod
    async def open(cls, listen: str) -> MetricsServer:
        host, port = parse_listen(listen)
        holder: list[MetricsServer] = []
        try:
            server = await asyncio.start_server(lambda r, w: holder[0]._connected(r, w), host, port,
                                                reuse_address=True, start_serving=False)
        except OSError as exc:
            reason = "address in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise StartupError(f"cannot listen on {listen} (--metrics-listen): {reason}") from None
        bound = server.sockets[0].getsockname()[1]
        holder.append(cls(server, f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"))
        return holder[0]

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._requests is None:  # stopping
            writer.close()
            return
        self._requests.create_task(self._serve_one(reader, writer))

    @staticmethod
    async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve_one(reader, writer)
        except Exception:  # a bug answering one request must not end the others (their TaskGroup)
            log.exception("metrics request failed")

    async def serve(self) -> None:
        """Serve until cancelled; then the port closes and the requests in flight are cancelled."""
        async with self.server, asyncio.TaskGroup() as requests:
            self._requests = requests
            log.info("metrics serving", address=self.address, paths="/metrics /healthz /readyz")
            try:
                await self.server.serve_forever()
            finally:
                self._requests = None
