"""Worker liveness: a worker's death seen through its database session, not after its lease.

A worker that holds a liveness session claims its sagas under a *live owner id* (``~`` followed
by an ordinary owner id, ``host:pid:random-counter``; no host name holds a ``~``). While the
session lives it holds a lock named after that owner id:

- PostgreSQL: a session-level advisory lock, ``pg_try_advisory_lock(<table key>,
  hashtext(owner))``;
- MySQL/MariaDB: ``GET_LOCK('sagakit:' || MD5(owner), 0)``;
- SQLite and the memory storage: no lock; a live owner on this host is alive while its process
  is (its pid), and an owner of this very process while its session is open.

Every claim treats a live lease as expired when its owner is dead by that test (the lock is
free, the process is gone), so a SIGKILLed worker's sagas are taken over as soon as another
worker's session looks for orphans (every two seconds by default: about a second later on
average), instead of after the lease. A live but silent owner (a
paused process, a stalled link: the server still holds its session) is never taken over early:
its lease stays the rule. An owner id without ``~`` (a saga run in-process, a worker without a
session) is never judged by liveness at all.

The session is a connection of its own, outside the pool (PostgreSQL and MySQL/MariaDB only).
Every two seconds it looks for orphans (sagas in flight under a dead owner) with one query, and
wakes its worker when there are some; that query is its health check too. (While nothing is
in flight under another worker, the looks grow apart; see :class:`Liveness`.) Should it fail (the link cut, the server restarted), the lock may be gone
and another worker may take the sagas over at once: so every run under that owner id is cut off
on the spot (its step in flight cancelled, as a lost lease does; :meth:`Held.lose`), the worker
claims under a plain owner id meanwhile, and the session is opened again, with backoff, under a
new live owner id. A database restart therefore resumes the sagas in flight from their last
checkpoint (their step in flight runs again, at least once as always).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from sagakit.exceptions import SagaLeaseLostError
from sagakit.storage.run import new_owner_id

__all__ = [
    "BUSY", "LIVE_MARK", "ORPHANS", "QUIET", "Held", "Liveness", "SessionBackend", "held_by", "live_owner_id",
    "owner_is_dead",
]

logger = logging.getLogger("sagakit.storage")

LIVE_MARK = "~"
"""The first character of a live owner id."""

QUIET, BUSY, ORPHANS = 0, 1, 2
"""What a session's look finds among the sagas in flight under other live owners: none, some
(every owner alive), or some under an owner whose session is gone (orphans)."""

_HOST = socket.gethostname()


def live_owner_id() -> str:
    """A fresh live owner id (unique, as :func:`~sagakit.storage.run.new_owner_id` is)."""
    return LIVE_MARK + new_owner_id()


@dataclasses.dataclass(eq=False)
class Held:
    """One live owner id held by a session of this process, and the lease keepers of the runs
    under it (so that losing the session cuts them off at once)."""

    owner: str
    lost: SagaLeaseLostError | None = None
    keepers: set[Any] = dataclasses.field(default_factory=set)

    def lose(self, why: str) -> None:
        """The session is gone: every run under this owner id stops (its step in flight is
        cancelled, and it starts no other; see :meth:`sagakit.lease.LeaseKeeper.lose`)."""
        if self.lost is not None:
            return
        self.lost = SagaLeaseLostError(
            f"the liveness session of {self.owner} was lost ({why}): another worker may take "
            "its sagas over now")
        _held.pop(self.owner, None)
        for keeper in list(self.keepers):
            keeper.lose(self.lost)


_held: dict[str, Held] = {}


def held_by(owner: str | None) -> Held | None:
    """The session of this process holding ``owner``, if any (None also once it is lost)."""
    return _held.get(owner) if owner is not None and owner[:1] == LIVE_MARK else None


def owner_is_dead(owner: str | None) -> bool:
    """The liveness test of SQLite and the memory storage: whether ``owner`` is a live owner
    id whose holder is known to be gone. An owner of this process is dead once its session is
    closed or lost; one of another process on this host once that process is gone. Anything
    else (no ``~``, another host, a malformed id) is not judged: False, its lease rules."""
    if not owner or owner[0] != LIVE_MARK:
        return False
    host, _, rest = owner[1:].partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _held
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, but not ours to signal
        return False
    return False


class SessionBackend(Protocol):
    """How a storage holds a liveness session: a connection of its own with the owner's lock."""

    async def open(self, owner: str, on_lost: Callable[[], object]) -> Any | None:
        """Connect and take ``owner``'s lock; None if another session holds that lock.
        ``on_lost()`` may be called the moment the driver sees the connection end (PostgreSQL),
        sooner than the next look would."""

    async def watch(self, session: Any, owner: str) -> int:
        """One round trip on the session (raises if it is gone): QUIET, BUSY or ORPHANS."""

    async def close(self, session: Any) -> None:
        """Close the session (its lock goes with it)."""


class Liveness:
    """``async with storage.liveness() as live:`` for as long as a worker runs; ``live.owner``
    is the owner id to claim under now: a live one while the session holds its lock, a plain
    one while it does not (the database unreachable, say: then the lease alone rules, as for
    any in-process run).

    Every ``every`` seconds (with jitter) the session looks for orphans, sagas in flight under
    another owner whose session is gone, and calls ``on_orphans()`` when there are some (a
    worker polls then, and takes them over): one query, so that a dead worker's sagas wait
    about ``every / 2`` seconds on average. While its looks find no saga in flight under another
    live owner at all, the wait between them grows by half each time up to ``max_quiet``
    seconds (an idle fleet stays quiet), until :meth:`poke` (the worker was woken for new work)
    or a look that finds some brings it back to ``every``.

    With a ``backend`` (PostgreSQL, MySQL/MariaDB) the session is opened on entry (a failure is
    logged, and retried in the background with backoff up to ``max_backoff`` seconds), and its
    look for orphans is also its health check: a look that raises or does not answer within
    ``ping_timeout`` seconds loses the session, which is reopened under a new owner id;
    ``on_change(owner)`` is called with the new owner id each time it changes. Without one
    (SQLite, memory) the process's own life is the session: it cannot be lost, and ``watch``
    (if given) looks for orphans."""

    def __init__(self, backend: SessionBackend | None = None, *, every: float = 2.0,
                 max_quiet: float = 2.0,
                 watch: Callable[[str], Awaitable[int]] | None = None,
                 ping_timeout: float = 10.0, max_backoff: float = 10.0,
                 on_change: Callable[[str], object] | None = None,
                 on_orphans: Callable[[], object] | None = None) -> None:
        self.backend = backend
        self.every = every
        self.max_quiet = max_quiet
        self.watch = watch
        self._quiet = 0  # looks in a row that found nothing in flight
        self.on_orphans = on_orphans
        self.ping_timeout = ping_timeout
        self.max_backoff = max_backoff
        self.on_change = on_change
        self.owner = new_owner_id()
        self.held: Held | None = None
        self.losses = 0
        """Sessions lost so far (tests and operators)."""
        self._session: Any = None
        self._closing: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    def poke(self) -> None:
        """Look every ``every`` seconds again (work is coming: sagas will be in flight)."""
        self._quiet = 0

    def _next_look(self) -> float:
        wait = min(self.every * 1.5 ** min(self._quiet, 60), max(self.every, self.max_quiet))
        return wait * random.uniform(0.8, 1.2)

    def _found(self, found: int) -> None:
        self._quiet = self._quiet + 1 if found == QUIET else 0
        if found == ORPHANS and self.on_orphans is not None:
            self.on_orphans()

    @property
    def live(self) -> bool:
        """Whether claims made now are under a live owner id."""
        return self.held is not None

    async def __aenter__(self) -> Liveness:
        if self.backend is None:
            self._hold(live_owner_id(), None)
            if self.watch is not None:
                self._keeper = asyncio.create_task(self._watch_locally(self.watch))
            return self
        try:
            await self._open()
        except Exception as error:
            logger.warning("liveness session unavailable, leases alone rule until it opens: "
                           "%s", error)
        self._keeper = asyncio.create_task(self._keep_up())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        held, self.held = self.held, None
        if held is not None:
            _held.pop(held.owner, None)
        await self._close_session()

    def _hold(self, owner: str, session: Any) -> None:
        self.held = _held[owner] = Held(owner)
        self._session = session
        self._change(owner)

    def _change(self, owner: str) -> None:
        self.owner = owner
        if self.on_change is not None:
            self.on_change(owner)

    async def _open(self) -> None:
        assert self.backend is not None
        for _ in range(8):  # another session holding the same lock: a hash clash; draw again
            owner = live_owner_id()
            session = await asyncio.wait_for(
                self.backend.open(owner, functools.partial(self._ended, owner)),
                self.ping_timeout)
            if session is not None:
                self._hold(owner, session)
                return
        raise RuntimeError("no free liveness lock after 8 owner ids")

    async def _keep_up(self) -> None:
        failures = 0
        while True:
            if self.held is None:
                try:
                    await self._open()
                except Exception as error:
                    failures += 1
                    if failures == 1:
                        logger.warning("liveness session cannot open, retrying: %s", error)
                    await asyncio.sleep(min(self.max_backoff, 0.1 * 2 ** min(failures, 20))
                                        * random.uniform(0.8, 1.2))
                    continue
                if failures:
                    logger.warning("liveness session open again (owner %s)", self.owner)
                failures = 0
            with contextlib.suppress(TimeoutError):  # a session ended: reopen at once
                await asyncio.wait_for(self._kick.wait(), self._next_look())
            self._kick.clear()
            if self.held is None:
                continue
            try:
                async with asyncio.timeout(self.ping_timeout):
                    found = await self.backend.watch(  # type: ignore[union-attr]
                        self._session, self.owner)
            except Exception as error:
                self._lose(f"{type(error).__name__}: {error}")
                await self._close_session()
                continue
            self._found(found)

    async def _watch_locally(self, watch: Callable[[str], Awaitable[int]]) -> None:
        while True:
            await asyncio.sleep(self._next_look())
            try:
                found = await watch(self.owner)
            except Exception as error:  # the next poll finds them anyway
                logger.debug("looking for orphaned sagas failed: %s", error)
                continue
            self._found(found)

    def _ended(self, owner: str) -> None:
        """The driver saw the session's connection end: its lock is gone with it."""
        if self.held is not None and self.held.owner == owner:
            self._lose("its connection ended")
            closing = asyncio.get_running_loop().create_task(self._close_session())
            self._closing = closing  # keep a reference until it is done
            self._kick.set()

    def _lose(self, why: str) -> None:
        held, self.held = self.held, None
        if held is None:
            return
        self.losses += 1
        logger.warning("liveness session of %s lost (%s): its runs stop, leases alone rule "
                       "until it reopens", held.owner, why)
        held.lose(why)
        self._change(new_owner_id())

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None and self.backend is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.backend.close(session), 2.0)
