"""FaultProxy against the real PostgreSQL and MariaDB servers (the suite's DSNs).

A cut resets both sides: the client's connection fails with what sagakit calls a connection
error, the server ends the session (its advisory lock is free again) and new connections fail
until ``heal()``. A stall holds bytes both ways without breaking anything: a query sent during
it does not reach the server (the lock it would release stays held), a NOTIFY does not reach the
client, a new connection does not reach the server; after ``heal()`` all of it goes through.
Two tests put a plain listening socket upstream instead, to see what the server side gets: an
RST on a cut, nothing at all (no bytes, no connection) during a stall while the client's sends
block once the kernel buffers are full.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncmy
import asyncmy.errors
import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url

from sagakit.storage.faults import Fault, classify
from tests.acceptance.faultproxy import FaultProxy
from tests.conftest import MYSQL_DSN, POSTGRES_DSN, server_unavailable

pytestmark = pytest.mark.acceptance

PG = make_url(POSTGRES_DSN)
MY = make_url(MYSQL_DSN)


def _addr(url: URL, default_port: int) -> tuple[str, int]:
    return url.host or "127.0.0.1", url.port or default_port


async def _pg(port: int | None = None, **kwargs: Any) -> Any:
    """An asyncpg connection to the server, or to a proxy on ``port``."""
    host, server_port = _addr(PG, 5432)
    return await asyncpg.connect(host=host, port=port or server_port, user=PG.username,
                                 password=PG.password, database=PG.database, timeout=10,
                                 **kwargs)


async def _my(port: int | None = None) -> Any:
    """An autocommit asyncmy connection to the server, or to a proxy on ``port``."""
    host, server_port = _addr(MY, 3306)
    return await asyncmy.connect(host=host, port=port or server_port, user=MY.username or "root",
                                 password=MY.password or "", database=MY.database,
                                 autocommit=True)


async def _my_value(conn: Any, sql: str, *args: Any) -> Any:
    async with conn.cursor() as cursor:
        await cursor.execute(sql, args or None)
        row = await cursor.fetchone()
    return None if row is None else row[0]


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (up to 10 s) for ``check()`` to hold; fail naming ``what`` otherwise."""
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"never happened: {what}")


async def _connection_error(attempt: Awaitable[Any]) -> None:
    """Await ``attempt`` (10 s at most): it must fail, not hang, with an error sagakit classifies
    as a connection fault."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the classification is the check
        await asyncio.wait_for(attempt, 10)
    assert not isinstance(caught.value, TimeoutError), "hung instead of failing"
    assert classify(caught.value) is Fault.UNAVAILABLE, repr(caught.value)


@pytest.fixture
async def pg_direct() -> AsyncIterator[Any]:
    try:
        conn = await _pg()
    except OSError as exc:
        server_unavailable("PostgreSQL", exc)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def my_direct() -> AsyncIterator[Any]:
    try:
        conn = await _my()
    except (OSError, asyncmy.errors.OperationalError) as exc:
        server_unavailable("MariaDB", exc)
    try:
        yield conn
    finally:
        conn.close()


def _exchange(client: socket.socket, server: socket.socket) -> None:
    """One message each way through the proxy."""
    client.sendall(b"ping")
    assert _recv_exactly(server, 4) == b"ping"
    server.sendall(b"pong")
    assert _recv_exactly(client, 4) == b"pong"


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _connect_and_read(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(1)


def test_cut_resets_both_sides_and_new_connections() -> None:
    """Plain sockets on both ends: after a cut, the client's and the upstream server's reads fail
    with ECONNRESET (an RST, not an orderly close), and so does a connection made while cut."""
    with socket.create_server(("127.0.0.1", 0)) as upstream, \
            FaultProxy("127.0.0.1", upstream.getsockname()[1]) as proxy:
        upstream.settimeout(5)
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        server, _ = upstream.accept()
        server.settimeout(5)
        _exchange(client, server)
        assert (proxy.accepted, proxy.open_connections) == (1, 1)

        proxy.cut()
        for sock in (client, server):
            with sock, pytest.raises(ConnectionResetError):
                sock.recv(1)
        with pytest.raises(ConnectionResetError):  # on connect() or on the first read
            _connect_and_read(proxy.port)
        assert (proxy.state, proxy.accepted, proxy.refused, proxy.open_connections) == (
            "cut", 2, 1, 0)

        proxy.heal()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            server, _ = upstream.accept()
            with server:
                server.settimeout(5)
                _exchange(client, server)
                client.shutdown(socket.SHUT_WR)  # a half-close is passed on
                assert server.recv(1) == b""
                server.sendall(b"bye")
            assert _recv_exactly(client, 3) == b"bye"
            assert client.recv(1) == b""
        for _ in range(100):  # both ends closed: the proxy lets the connection go
            if proxy.open_connections == 0:
                break
            time.sleep(0.05)
        assert proxy.open_connections == 0


def test_stall_holds_bytes_and_new_connections_until_healed() -> None:
    """Plain sockets on both ends: while stalled the proxy reads nothing (the client's sends
    block once the kernel buffers are full), delivers nothing and makes no upstream connection;
    after heal() every byte arrives, in order, and the held connection is connected."""
    with socket.create_server(("127.0.0.1", 0)) as upstream, \
            FaultProxy("127.0.0.1", upstream.getsockname()[1]) as proxy:
        upstream.settimeout(5)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client, \
                upstream.accept()[0] as server:
            server.settimeout(5)
            _exchange(client, server)

            proxy.stall()
            client.setblocking(False)
            block, sent = bytes(range(256)) * 256, bytearray()
            with contextlib.suppress(BlockingIOError):
                while len(sent) < 256 * 2**20:  # far beyond any loopback buffers
                    sent += block[:client.send(block)]
            assert len(sent) < 256 * 2**20, "the proxy kept reading while stalled"
            late = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            readable, _, _ = select.select([upstream, server], [], [], 0.5)
            assert readable == [], "bytes forwarded or an upstream connection made while stalled"
            assert (proxy.state, proxy.open_connections) == ("stalled", 2)

            proxy.heal()
            client.settimeout(5)
            assert _recv_exactly(server, len(sent)) == bytes(sent)
            with late, upstream.accept()[0] as late_server:
                late_server.settimeout(5)
                _exchange(late, late_server)


async def test_postgres_cut_ends_the_session_and_refuses_until_healed(pg_direct: Any) -> None:
    key = random.randrange(1, 2**62)
    with FaultProxy(*_addr(PG, 5432)) as proxy:
        conn = await _pg(proxy.port)
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
            assert not await pg_direct.fetchval("SELECT pg_try_advisory_lock($1)", key)
            assert (proxy.state, proxy.open_connections) == ("up", 1)

            proxy.cut()
            assert (proxy.state, proxy.open_connections) == ("cut", 0)
            await _connection_error(conn.fetchval("SELECT 1"))

            async def session_gone() -> bool:
                return not await pg_direct.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

            await _eventually(session_gone, f"backend {pid} gone from pg_stat_activity")
            await _eventually(lambda: pg_direct.fetchval("SELECT pg_try_advisory_lock($1)", key),
                              "the advisory lock taken through the proxy is free")
            await pg_direct.execute("SELECT pg_advisory_unlock($1)", key)

            await _connection_error(_pg(proxy.port))
            assert proxy.refused == 1
        finally:
            await conn.close()

        proxy.heal()
        again = await _pg(proxy.port)
        try:
            assert await again.fetchval("SELECT 41 + 1") == 42
            assert (proxy.state, proxy.open_connections) == ("up", 1)
        finally:
            await again.close()


async def test_postgres_stall_holds_bytes_both_ways_until_healed(pg_direct: Any) -> None:
    key = random.randrange(1, 2**62)
    channel = f"faultproxy_{os.getpid()}"
    held_name = f"faultproxy-held-{os.getpid()}"
    with FaultProxy(*_addr(PG, 5432)) as proxy:
        conn = await _pg(proxy.port)
        try:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            notes: list[str] = []
            await conn.add_listener(channel, lambda *args: notes.append(args[3]))
            assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)

            proxy.stall()
            assert proxy.state == "stalled"
            for payload in ("a", "b", "c"):  # server to client: held
                await pg_direct.execute("SELECT pg_notify($1, $2)", channel, payload)
            unlock = asyncio.ensure_future(  # client to server: held too
                conn.fetchval("SELECT pg_advisory_unlock($1)", key))
            newcomer = asyncio.ensure_future(
                _pg(proxy.port, server_settings={"application_name": held_name}))
            done, _ = await asyncio.wait({unlock, newcomer}, timeout=0.5)
            assert not done
            assert notes == []
            assert proxy.open_connections == 2

            held = await pg_direct.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = $1", pid)
            assert held == 1, "the unlock must not have reached the server"
            assert not await pg_direct.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", held_name)

            proxy.heal()
            assert await unlock is True
            async def notified() -> bool:
                return notes == ["a", "b", "c"]

            await _eventually(notified, "the held notifications arrive, in order")
            late = await newcomer
            try:
                assert await late.fetchval("SELECT current_setting('application_name')") == held_name
            finally:
                await late.close()
            assert await pg_direct.fetchval("SELECT pg_try_advisory_lock($1)", key)
            await pg_direct.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            await conn.close()


async def test_mariadb_cut_ends_the_session_and_refuses_until_healed(my_direct: Any) -> None:
    lock = f"faultproxy_{os.getpid()}_{random.randrange(10**9)}"
    with FaultProxy(*_addr(MY, 3306)) as proxy:
        conn = await _my(proxy.port)
        try:
            conn_id = await _my_value(conn, "SELECT CONNECTION_ID()")
            assert await _my_value(conn, "SELECT GET_LOCK(%s, 0)", lock) == 1
            assert await _my_value(my_direct, "SELECT IS_USED_LOCK(%s)", lock) == conn_id

            proxy.cut()
            assert (proxy.state, proxy.open_connections) == ("cut", 0)
            await _connection_error(_my_value(conn, "SELECT 1"))

            async def session_gone() -> bool:
                return not await _my_value(
                    my_direct, "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s",
                    conn_id)

            await _eventually(session_gone, f"connection {conn_id} gone from the processlist")
            assert await _my_value(my_direct, "SELECT IS_FREE_LOCK(%s)", lock) == 1

            await _connection_error(_my(proxy.port))
            assert proxy.refused == 1
        finally:
            conn.close()

        proxy.heal()
        again = await _my(proxy.port)
        try:
            assert await _my_value(again, "SELECT 41 + 1") == 42
        finally:
            again.close()
