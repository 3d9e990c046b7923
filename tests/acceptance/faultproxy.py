"""A fault-injecting TCP proxy: a "network link" between one process and a database server.

``FaultProxy(host, port)`` listens on 127.0.0.1 (a free port, ``proxy.port``) and forwards the
bytes of every connection made to it, both ways, to ``host:port``. It runs its own asyncio event
loop in a background thread, so a synchronous harness (plain Python driving subprocesses) and an
async test alike can call its methods; each one returns once its effect has been applied:

- ``cut()``: every open connection is closed abruptly on both sides with a TCP RST (SO_LINGER 0),
  so the client's next read or write fails and the database server ends the session at once
  (releasing its locks); connections made while cut are accepted and reset at once.
- ``stall()``: the proxy stops reading from every socket, so nothing is forwarded either way and
  the kernel buffers fill: the peers see silence, not errors. Connections made while stalled are
  accepted but not connected upstream.
- ``heal()``: back to forwarding; what a stall held is delivered, in order; connections accepted
  during the stall are connected upstream.

``state`` is "up", "cut" or "stalled"; ``accepted``, ``open_connections`` and ``refused`` count
connections. ``close()`` (or leaving the ``with`` block) resets every connection and stops.

Limits: bytes read before a stall that still wait in the proxy's write buffer (only when the
receiver was already not keeping up) are still delivered during the stall; a peer closing its
socket during a stall is noticed only after ``heal()``; upstream connect errors reset the client;
a connection still in the listen backlog (not yet accepted by the loop) when ``cut()`` runs is
treated as a new one. IPv4 loopback only; not built for throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

UP, CUT, STALLED = "up", "cut", "stalled"
_T = TypeVar("_T")


def _reset(transport: asyncio.Transport) -> None:
    """Close ``transport`` at once, sending a TCP RST rather than a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        with contextlib.suppress(OSError):  # already gone
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Side(asyncio.Protocol):
    """One socket of a link: the client's accepted one or the upstream one."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.peer_full = False  # the peer's write buffer is above its high-water mark
        self.eof = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.link.done:  # cut (or the client gone) before this socket was set up
            _reset(transport)
            return
        self.sync()  # read only when forwarding: never before the upstream side exists

    def sync(self) -> None:
        """Read iff the proxy is up, the peer is connected and is keeping up with our data."""
        t = self.transport
        if t is None or t.is_closing():
            return
        want = self.link.proxy.state == UP and self.peer is not None and not self.peer_full
        if want and not t.is_reading():
            t.resume_reading()
        elif not want and t.is_reading():
            t.pause_reading()

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        assert self.peer.transport is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True  # pass the half-close on; close both once both ways are done
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and not peer.is_closing() and peer.can_write_eof():
            peer.write_eof()
        if self.peer is not None and self.peer.eof:  # both peers are done: close gracefully
            for side in self.link.sides():
                if side.transport is not None:
                    side.transport.close()
        return True

    def pause_writing(self) -> None:  # our write buffer is full: the peer stops reading
        self._backpressure(True)

    def resume_writing(self) -> None:
        self._backpressure(False)

    def _backpressure(self, full: bool) -> None:
        if self.peer is not None:
            self.peer.peer_full = full
            self.peer.sync()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.link.lost(self, exc)


class _Link:
    """A client connection and, once connected, its upstream connection."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.server: _Side | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.done = False

    def sides(self) -> list[_Side]:
        return [s for s in (self.client, self.server) if s is not None]

    def connect(self) -> None:
        if self.connecting is None and not self.done:
            self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        server = _Side(self)
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: server, self.proxy.target_host, self.proxy.target_port)
        except OSError:
            self.reset()
            return
        if self.done or self.proxy.state == CUT:
            assert server.transport is not None
            _reset(server.transport)
            return
        self.server, server.peer, self.client.peer = server, self.client, server
        self.client.sync()
        server.sync()

    def reset(self) -> None:
        """Close both sides with RST (a cut)."""
        self.done = True
        if self.connecting is not None:
            self.connecting.cancel()
        for side in self.sides():
            if side.transport is not None:
                _reset(side.transport)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        """One side is gone: the other follows, abruptly if the first one failed."""
        self.done = True
        if self.connecting is not None and self.server is None:
            self.connecting.cancel()
        other = self.server if side is self.client else self.client
        if other is not None and other.transport is not None and not other.transport.is_closing():
            if exc is None:
                other.transport.close()
            else:
                _reset(other.transport)
        if all(s.closed.done() or s.transport is None for s in self.sides()):
            self.proxy._links.discard(self)


class FaultProxy:
    """A TCP proxy to ``target_host:target_port`` whose link can be cut, stalled and healed."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.state = UP
        self.accepted = 0  # connections accepted, in total
        self.refused = 0  # connections reset on arrival because the link was cut
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    @property
    def open_connections(self) -> int:
        """Client connections accepted and not yet closed."""
        return len(self._links)

    def start(self) -> FaultProxy:
        """Bind 127.0.0.1 on a free port (``self.port``) and start forwarding."""
        if self._loop is not None:
            raise RuntimeError("FaultProxy already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy",
                                        daemon=True)
        self._thread.start()
        self._server = self._run(self._loop.create_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        """Reset every open connection on both sides; reset new ones until ``heal()``."""
        self._run(self._set(CUT))

    def stall(self) -> None:
        """Stop forwarding: hold every connection's bytes (and new connections) until ``heal()``."""
        self._run(self._set(STALLED))

    def heal(self) -> None:
        """Forward again: held bytes are delivered, held connections connected upstream."""
        self._run(self._set(UP))

    def close(self) -> None:
        """Stop listening, reset every connection and stop the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        self._run(self._shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> FaultProxy:
        return self if self._loop is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None or self._loop.is_closed():
            coro.close()
            raise RuntimeError("FaultProxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _accept(self) -> _Side:
        self.accepted += 1
        link = _Link(self)
        if self.state == CUT:
            self.refused += 1
            link.done = True  # connection_made resets it
        else:
            self._links.add(link)
            if self.state == UP:
                link.connect()
        return link.client

    async def _set(self, state: str) -> None:
        self.state = state
        links = list(self._links)
        for link in links:
            if state == CUT:
                link.reset()
                continue
            for side in link.sides():
                side.sync()
            if state == UP:
                link.connect()
        if state == CUT:  # wait for every socket to be closed and every upstream connect to end
            waits = [s.closed for link in links for s in link.sides() if s.transport is not None]
            tasks = [link.connecting for link in links if link.connecting is not None]
            await asyncio.gather(*waits, *tasks, return_exceptions=True)
            self._links.difference_update(links)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._set(CUT)
        await self._server.wait_closed()
