"""What every storage's run shares: buffering the seed's operations into one checkpoint.

A storage subclasses :class:`BufferedRun` and implements the few primitives that touch its
backend (``_write``, ``start``, ``claim``, ``renew_lease``, ``release`` and the reads). The
commit-per-call methods of a storage are one-shot runs (:class:`RunBackedStorage`), so both
paths share the same write code and cannot drift.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any
from uuid import UUID

from sagakit import settings
from sagakit.exceptions import (
    SagaDefinitionError,
    SagaError,
    SagaSerializationError,
    SagaStorageError,
)
from sagakit.records import (
    SagaAction,
    SagaLogEntry,
    SagaState,
    SagaStatus,
    SagaStepStatus,
)
from sagakit.storage.listener import wake_payload

__all__ = [
    "MAX_DETAILS", "BufferedRun", "Checkpoint", "PendingEntry", "RunBackedStorage",
    "log_text", "new_owner_id", "refuse_nul", "releases_lease", "wrong_saga",
]

_HOST = socket.gethostname()
logger = logging.getLogger("sagakit.storage")


def wrong_saga(saga_id: UUID, stored: str, expected: str) -> SagaDefinitionError:
    """The error for claiming a stored saga under another saga's definition."""
    return SagaDefinitionError(
        f"saga {saga_id} is a {stored!r} saga, not {expected!r}; nothing was written",
        saga_id=saga_id, saga_name=expected,
    )


# A JSON escape of U+0000 that is not itself an escaped backslash followed by "u0000".
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
MAX_DETAILS = 8000
"""Characters of a log entry's details kept (MySQL's TEXT holds 64 KiB); the rest is cut."""
_MAX_ATTEMPT = 2**31 - 1  # the logs' attempt column is a SQL INTEGER


def refuse_nul(saga_id: UUID, data: bytes) -> None:
    """Raise SagaSerializationError if a context's JSON holds U+0000. PostgreSQL can store it in
    neither JSONB nor text, so no sagakit storage takes it: a saga behaves the same on each."""
    if _NUL.search(data):
        raise SagaSerializationError(
            f"saga {saga_id}: the context holds the character U+0000 (NUL), which the storage "
            "cannot keep; remove it or encode the value (e.g. base64)", saga_id=saga_id,
        )


def log_text(text: str | None, limit: int = MAX_DETAILS) -> str | None:
    """A log entry's text as every storage can keep it: U+0000 written as ``\\x00`` and cut
    to ``limit`` characters."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if len(text) > limit:
        text = text[: limit - 14] + " ... (cut off)"
    return text


def releases_lease(status: SagaStatus | None) -> bool:
    """Whether writing this status ends the run's lease (terminal, PARKED or WAITING). Identity
    tests: ``in`` on enum members would call their Python-level ``__eq__``/``__hash__``."""
    return (status is SagaStatus.COMPLETED or status is SagaStatus.FAILED
            or status is SagaStatus.PARKED or status is SagaStatus.WAITING)


def new_owner_id() -> str:
    """A lease owner id unique to one run: host, process, a random part drawn once per process
    (again in a forked child) and a counter."""
    return f"{_OWNER_PREFIX}{next(_owner_counter):x}"


def _new_owner_prefix() -> None:
    global _OWNER_PREFIX, _owner_counter
    _OWNER_PREFIX = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}-"
    _owner_counter = itertools.count(1)


_OWNER_PREFIX = ""
_owner_counter = itertools.count(1)
_new_owner_prefix()
os.register_at_fork(after_in_child=_new_owner_prefix)


@dataclasses.dataclass(slots=True)
class PendingEntry:
    step_name: str
    action: SagaAction
    status: SagaStepStatus
    details: str | None
    error_type: str | None
    attempt: int | None = None


@dataclasses.dataclass(slots=True)
class Checkpoint:
    """The writes of one checkpoint, sent together by ``commit()``.

    ``fence_owner``/``fence_version`` are set when the run holds the saga's lease: the write
    applies only if the row still has that owner and version. ``expected_version`` comes from
    ``update_context(current_version=...)``. ``lease_seconds`` extends the lease (None: leave
    it); ``releases_lease`` (kept by :class:`BufferedRun` as the status is set) says the
    checkpoint releases it: a terminal, PARKED or WAITING status does. ``wake``: a wake-up to
    send with the write (see :mod:`sagakit.storage.listener`), where the storage has them.

    Forward recovery: ``wait_seconds`` sets ``next_attempt_at`` to the database's now plus that
    many seconds (a releasing wait also writes WAITING);
    ``clear_wait`` sets ``next_attempt_at`` back to NULL (never together with a wait: the later
    of the two calls wins); ``past_pivot`` marks the saga past its pivot (never unmarked).
    """

    saga_id: UUID
    create_name: str | None = None
    context: Mapping[str, Any] | None = None
    status: SagaStatus | None = None
    entries: list[PendingEntry] = dataclasses.field(default_factory=list)
    expected_version: int | None = None
    fence_owner: str | None = None
    fence_version: int | None = None
    lease_seconds: float | None = None
    reset_attempts: bool = False
    wait_seconds: float | None = None
    clear_wait: bool = False
    past_pivot: bool = False
    releases_lease: bool = False
    wake: str | None = None


class BufferedRun(abc.ABC):
    """A run that buffers the seed's operations and writes them at ``commit()``."""

    def __init__(self) -> None:
        self.owner = new_owner_id()
        self.saga_id: UUID | None = None
        self.version: int | None = None
        self.lease_seconds: float | None = None
        self.holds_lease = False
        self.retry_after: float | None = None
        """Set before the run ends to make recovery wait this long before the next attempt."""
        self.last_commit: float | None = None  # time.monotonic() of the last durable write
        self.lease_until: float | None = None
        """time.monotonic() until which this run's lease surely holds: a lease-extending write
        acknowledged, plus the lease, counted from when the write was sent."""
        self.fencing_token = 0
        self.queue: str | None = None  # the queue of the saga whose lease this run took
        """The saga's version when this run took its lease (``start``: 1 for a new saga;
        ``claim``/``adopt``: the version the claim wrote). Every takeover is a claim and every
        claim writes a new version, so a later run's token is larger; this run's checkpoints
        do not change it. Steps see it as ``fencing_token``."""
        self._pending: Checkpoint | None = None

    # -- buffered operations (the seed protocol) ----------------------------------------------

    def _buffer(self, saga_id: UUID) -> Checkpoint:
        pending = self._pending
        if pending is None:
            pending = self._pending = Checkpoint(saga_id=saga_id)
        elif pending.saga_id is not saga_id and pending.saga_id != saga_id:
            raise SagaError(
                f"a run buffers one saga at a time: commit {pending.saga_id} before writing "
                f"{saga_id}",
                saga_id=saga_id,
            )
        return pending

    async def create_saga(self, saga_id: UUID, name: str, context: Mapping[str, Any]) -> None:
        pending = self._buffer(saga_id)
        pending.create_name = name
        pending.context = context

    async def update_context(
        self, saga_id: UUID, context: Mapping[str, Any], current_version: int | None = None
    ) -> None:
        pending = self._buffer(saga_id)
        pending.context = context
        if current_version is not None:
            pending.expected_version = current_version

    async def update_status(self, saga_id: UUID, status: SagaStatus) -> None:
        pending = self._buffer(saga_id)
        pending.status = status = SagaStatus(status)
        pending.releases_lease = releases_lease(status)

    async def log_step(
        self,
        saga_id: UUID,
        step_name: str,
        action: str,
        status: SagaStepStatus,
        details: str | None = None,
        *,
        error_type: str | None = None,
        attempt: int | None = None,
    ) -> None:
        if details is not None:
            details = log_text(details)
        if error_type is not None:
            error_type = log_text(error_type, 255)
        if attempt is not None:
            attempt = settings.count("attempt", attempt, maximum=_MAX_ATTEMPT)
        entry = PendingEntry(
            step_name,
            action if type(action) is SagaAction else SagaAction(action),
            status if type(status) is SagaStepStatus else SagaStepStatus(status),
            details,
            error_type,
            attempt,
        )
        self._buffer(saga_id).entries.append(entry)

    async def reset_recovery_attempts(self, saga_id: UUID) -> None:
        """Buffer setting the recovery attempt count back to 0 (an explicit resume)."""
        self._buffer(saga_id).reset_attempts = True

    async def wait(self, saga_id: UUID, seconds: float, *, release: bool) -> None:
        """Buffer a wait before the saga's next attempt: ``next_attempt_at`` = now (the
        database's clock) + ``seconds``. With ``release``, also status WAITING, and the commit
        releases the lease. ValueError (nothing buffered) for seconds that are not a finite
        number >= 0."""
        seconds = settings.seconds("wait seconds", seconds)
        pending = self._buffer(saga_id)
        pending.wait_seconds = seconds
        pending.clear_wait = False
        if release:
            pending.status = SagaStatus.WAITING
            pending.releases_lease = True

    async def clear_wait(self, saga_id: UUID) -> None:
        """Buffer setting ``next_attempt_at`` back to NULL (a wait buffered before it in the
        same checkpoint is dropped; its status and lease release are kept)."""
        pending = self._buffer(saga_id)
        pending.clear_wait = True
        pending.wait_seconds = None

    async def pivot(self, saga_id: UUID) -> None:
        """Buffer marking the saga past its pivot (``past_pivot``; never unmarked)."""
        self._buffer(saga_id).past_pivot = True

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    async def commit(self) -> None:
        pending = self._pending
        if pending is None:
            return
        releases = pending.releases_lease
        same = pending.saga_id is self.saga_id or pending.saga_id == self.saga_id
        if same and pending.create_name is None:
            # Once a run knows the saga's version, every later write of it is fenced by that
            # version; while it holds (or held and lost) the lease, by its owner id as well.
            pending.fence_version = self.version
            if self.holds_lease:
                pending.fence_owner = self.owner
                if not releases:
                    pending.lease_seconds = self.lease_seconds
                elif self.queue is not None or pending.wait_seconds is not None:
                    # a submitted saga's slot frees, or a durable wait begins: wake workers
                    pending.wake = wake_payload(self.queue, pending.wait_seconds or 0.0)
        sent = time.monotonic()
        try:
            version = await self._write(pending)
        finally:
            self._pending = None
        self.last_commit = time.monotonic()
        if pending.fence_owner is not None and pending.lease_seconds is not None:
            self.lease_until = sent + pending.lease_seconds
        if same or self.saga_id is None:
            self.saga_id = pending.saga_id
            self.version = version
            if releases:
                self.holds_lease = False

    async def rollback(self) -> None:
        self._pending = None

    def confirm_lease(self, sent: float) -> None:
        """A renewal sent at ``sent`` (time.monotonic()) went through."""
        if self.lease_seconds is not None:
            self.lease_until = sent + self.lease_seconds
        self.last_commit = time.monotonic()

    def _took_lease(self, state: SagaState, lease_seconds: float,
                    sent: float | None = None) -> None:
        self.last_commit = time.monotonic()
        self.lease_until = (self.last_commit if sent is None else sent) + lease_seconds
        self.saga_id = state.saga_id
        self.version = self.fencing_token = state.version
        self.lease_seconds = lease_seconds
        self.holds_lease = state.lease_owner == self.owner
        self.queue = state.queue

    def adopt(self, state: SagaState, lease_seconds: float, *,
              sent: float | None = None) -> None:
        """Carry on under a lease already taken for this process by ``claim_due`` or
        ``claim_queued``: the run takes the lease's owner id, and fences its commits with it.
        ``sent``: when (``time.monotonic()``) the claim was sent; the lease is counted from
        then, never later than the database started it (default: now)."""
        if state.lease_owner is None:
            raise SagaError("adopt() needs a leased saga", saga_id=state.saga_id)
        self.owner = state.lease_owner
        self._took_lease(state, lease_seconds, sent)

    # -- backend primitives -------------------------------------------------------------------

    @abc.abstractmethod
    async def _write(self, checkpoint: Checkpoint) -> int:
        """Apply one checkpoint atomically; return the saga's new version."""

    @abc.abstractmethod
    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]: ...

    @abc.abstractmethod
    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]: ...

    @abc.abstractmethod
    async def start(
        self,
        saga_id: UUID,
        name: str,
        context: Mapping[str, Any],
        *,
        fingerprint: str | None,
        lease_seconds: float,
        deadline_seconds: float | None = None,
    ) -> tuple[SagaState, bool]: ...

    @abc.abstractmethod
    async def claim(
        self,
        saga_id: UUID,
        *,
        lease_seconds: float,
        count_attempt: bool = True,
        allow_parked: bool = False,
        name: str | None = None,
    ) -> SagaState: ...

    @abc.abstractmethod
    async def renew_lease(self, lease_seconds: float) -> None: ...

    @abc.abstractmethod
    async def release(self) -> None: ...


class _RunScope:
    """``async with storage.create_run() as run``: on the way out, drop what is buffered and
    give the lease up if the run still holds it (a class, not a generator: one per saga run)."""

    __slots__ = ("run",)

    def __init__(self, run: BufferedRun) -> None:
        self.run = run

    async def __aenter__(self) -> BufferedRun:
        return self.run

    async def __aexit__(self, *exc_info: object) -> None:
        run = self.run
        await run.rollback()
        if run.holds_lease:
            try:
                await run.release()
            except Exception as error:  # never mask the error that ended the run
                logger.warning("could not release the lease of saga %s (it runs out by "
                               "itself): %s", run.saga_id, error,
                               exc_info=not isinstance(error, SagaStorageError))


class RunBackedStorage(abc.ABC):
    """Commit-per-call methods implemented as one-shot runs of the storage's own run type."""

    @abc.abstractmethod
    def _new_run(self) -> BufferedRun: ...

    def create_run(self) -> AbstractAsyncContextManager[BufferedRun]:
        return _RunScope(self._new_run())

    async def create_saga(self, saga_id: UUID, name: str, context: Mapping[str, Any]) -> None:
        run = self._new_run()
        await run.create_saga(saga_id, name, context)
        await run.commit()

    async def update_context(
        self, saga_id: UUID, context: Mapping[str, Any], current_version: int | None = None
    ) -> None:
        run = self._new_run()
        await run.update_context(saga_id, context, current_version)
        await run.commit()

    async def update_status(self, saga_id: UUID, status: SagaStatus) -> None:
        run = self._new_run()
        await run.update_status(saga_id, status)
        await run.commit()

    async def log_step(
        self,
        saga_id: UUID,
        step_name: str,
        action: str,
        status: SagaStepStatus,
        details: str | None = None,
        *,
        error_type: str | None = None,
        attempt: int | None = None,
    ) -> None:
        run = self._new_run()
        await run.log_step(saga_id, step_name, action, status, details, error_type=error_type,
                           attempt=attempt)
        await run.commit()
