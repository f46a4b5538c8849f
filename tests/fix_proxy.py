"""Faults on demand: a TCP fault proxy on loopback, and a server of our own to restart.

Network faults are reproduced at the socket level, not by mocking the
driver: the proxy forwards bytes, and on demand stops forwarding without
closing anything (a black hole: a dead NAT entry, a partitioned link, a
failed-over load balancer), resets every connection (RST), or adds latency.
It runs on threads of its own, so it keeps its behaviour whatever the test's
event loop is doing, and it is started and stopped by the ``fault_proxy``
fixture.

Server restarts and server-wide settings (``ALTER SYSTEM``) need a PostgreSQL
that no other test or engineer shares: ``restartable_server`` is an embedded
one, restarted with its own ``pg_ctl``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Final

import pytest
from sqlalchemy.engine import make_url

from asyncpool.embedded import EmbeddedPostgres
from tests.fix_db import TestDatabase

#: How often blocked threads look at the stop flag (seconds).
_POLL: Final = 0.05
_CHUNK: Final = 65536
#: SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
_LINGER_RST: Final = struct.pack("ii", 1, 0)


class _Link:
    """One client connection and its upstream twin, pumped by two threads."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.threads = [
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                data = src.recv(_CHUNK)
                if not data:
                    break
                # Held here, never dropped, while black-holed: like TCP over a
                # partitioned link, the bytes arrive once the link heals.
                while not self.proxy.forwarding.wait(_POLL):
                    if self.closed.is_set():
                        return
                if self.proxy.latency:
                    time.sleep(self.proxy.latency)
                if self.closed.is_set():
                    return
                dst.sendall(data)
        except OSError:
            pass
        self.close(reset=False)

    def close(self, *, reset: bool) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                    sock.shutdown(socket.SHUT_RD)  # wakes the pump; sends nothing
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``upstream``; break the path on demand.

    Modes: :meth:`forward` (the default), :meth:`black_hole` (stop forwarding,
    accept new connections but pass nothing, close nothing), :meth:`reset`
    (RST every open connection; with ``refuse=True`` also every new one).
    ``latency`` delays every chunk by that many seconds.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.latency = 0.0
        self._refuse = False
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------------ modes

    def forward(self) -> None:
        """Pass bytes both ways again; held bytes flow on."""
        self._refuse = False
        self.forwarding.set()

    def black_hole(self) -> None:
        """Stop forwarding without closing: the peer never hears back."""
        self.forwarding.clear()

    def reset(self, *, refuse: bool = False) -> int:
        """Close every open connection with RST; ``refuse`` keeps doing it to new ones."""
        self._refuse = refuse
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close(reset=True)
        return len(links)

    @property
    def connections(self) -> int:
        """Open client connections through the proxy."""
        with self._lock:
            self._links = [link for link in self._links if not link.closed.is_set()]
            return len(self._links)

    # -------------------------------------------------------------- lifecycle

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self._refuse:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._links.append(_Link(self, client, upstream))

    def stop(self) -> None:
        """Stop accepting, reset every connection, join the threads."""
        self._stopped.set()
        self.forwarding.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close(reset=True)
        for link in links:
            for thread in link.threads:
                thread.join(5)


@pytest.fixture
def fault_proxy(database: TestDatabase) -> Iterator[FaultProxy]:
    """A fault proxy in front of the test database; ``proxied_url(database, proxy)``."""
    url = make_url(database.url)
    proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        yield proxy
    finally:
        proxy.stop()


def proxied_url(database: TestDatabase, proxy: FaultProxy) -> str:
    """The test database URL, routed through ``proxy``."""
    url = make_url(database.url).set(host="127.0.0.1", port=proxy.port)
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def restartable_server() -> Iterator[TestDatabase]:
    """An embedded PostgreSQL of the test module's own; ``.server.restart()`` is pg_ctl's."""
    with EmbeddedPostgres() as server:
        yield TestDatabase(server.dsn("postgres"), server=server)
