"""A link that can be cut without closing it: a TCP forwarder on loopback for failure injection.

``cut()`` makes it a blackhole in both directions: connections stay open, bytes sent into it are read
and thrown away, nothing comes out (what a partition or a dropped route looks like to both ends: no
reset, no FIN, only silence until a keepalive or a deadline notices). New connections are accepted and
swallowed the same way. ``heal()`` forwards again on new connections (the old ones lost bytes: their
ends must give them up, as they would after a real partition).

Threads, not asyncio: it runs inside a test process whose own code is synchronous; one thread per
direction per connection is plenty for an etcd client's one or two connections.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Link:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._start(self._accept)

    def cut(self) -> None:
        self._cut.set()

    def heal(self) -> None:
        self._cut.clear()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._track(client)
            if self._cut.is_set():
                self._start(self._pump, client, None)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._track(upstream)
            self._start(self._pump, client, upstream)
            self._start(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket | None) -> None:
        """source -> sink until either end closes; while cut, what source sends is dropped."""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if sink is not None and not self._cut.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            if sink is not None and not self._cut.is_set():
                try:
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        for thread in self._threads:
            thread.join(5)


@contextmanager
def links(targets: list[tuple[str, int]]) -> Iterator[list[Link]]:
    """One Link per target, all closed (their threads joined) on the way out."""
    made: list[Link] = []
    try:
        for target in targets:
            link = Link(target)
            made.append(link)
            link.start()
        yield made
    finally:
        for link in made:
            link.close()
