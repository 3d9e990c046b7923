"""Running sagas on a storage that implements only the seed's commit-per-call protocol.

When ``create_run()`` raises NotImplementedError (as the protocol's stub does), is missing,
or returns None, the orchestrator wraps the storage in :class:`CommitPerCallRun`: the same
checkpoints, each written as a sequence of commit-per-call writes (context first, then log entries, then status, so a crash between them
is resolved safely by recovery). Such storages have no leases: the orchestrator cannot tell a
live run from a crashed one, so run a single recovery worker per saga with them.

Forward recovery on such a storage, within what the seed's protocol can write:

- a log entry's attempt number goes into its ``details`` ("attempt 2: <the error>"), as the
  seed's ``log_step`` has no ``attempt``;
- a durable wait (``wait(..., release=True)``) writes status WAITING and nothing else: there is
  no ``next_attempt_at``, so recovery resumes a waiting saga as soon as it lists it (which
  takes a ``get_sagas_for_recovery`` that lists WAITING sagas: one written for the seed's
  statuses only leaves them waiting until they are recovered by id); a wait in the process
  writes nothing;
- ``pivot()``, ``clear_wait()`` and a start's deadline write nothing: such a storage keeps
  neither the pivot mark nor the deadline (``SagaState.past_pivot`` stays False,
  ``deadline_at`` None), so after a restart the engine knows them only from the step log.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast
from uuid import UUID

from sagakit.exceptions import SagaError, SagaNotFoundError, SagaStorageError
from sagakit.records import TERMINAL_STATUSES, ContextJSON, SagaLogEntry, SagaState, SagaStatus
from sagakit.storage.protocol import LeasedRun, SagaStorage
from sagakit.storage.run import BufferedRun, Checkpoint, wrong_saga

__all__ = ["CommitPerCallRun", "open_run"]


class CommitPerCallRun(BufferedRun):
    """A run over a commit-per-call storage; no leases, no fencing beyond explicit versions.

    Its ``fencing_token`` is the saga's version as the run found it when it began (after
    creating the saga, or after counting its recovery attempt). Where every write raises the
    version (as on sagakit's own storages), that orders runs that follow one another: a
    recovery's attempt is a write, so its token is larger than any earlier run's. It is a
    weaker fence than a leased run's: nothing stops two runs of one saga at once here, an
    explicit resume or abort counts no attempt (its token is larger only if the run before it
    wrote something), and a storage that keeps versions otherwise gives other numbers.
    """

    def __init__(self, storage: SagaStorage, seed_run: Any = None) -> None:
        super().__init__()
        self._storage = storage
        self._seed_run = seed_run

    async def _write(self, cp: Checkpoint) -> int:
        if self._seed_run is not None:  # a seed-style run: buffer there, commit once
            await _replay(self._seed_run, cp)
            await self._seed_run.commit()
            return (await self._storage.load_saga_state(cp.saga_id))[2]
        await _replay(self._storage, cp)
        return (await self._storage.load_saga_state(cp.saga_id))[2]

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        return await self._storage.load_saga_state(saga_id, read_for_update=read_for_update)

    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]:
        return await self._storage.get_step_history(saga_id)

    async def _state(self, saga_id: UUID, name: str = "") -> SagaState:
        get_saga = getattr(self._storage, "get_saga", None)
        if get_saga is not None:
            try:
                state = await get_saga(saga_id)
            except NotImplementedError:  # the protocol's stub, inherited
                state = None
            if state is not None:
                return cast(SagaState, state)
        status, context, version = await self._storage.load_saga_state(saga_id)
        return SagaState(saga_id, name, status, context, version)

    async def start(
        self,
        saga_id: UUID,
        name: str,
        context: Mapping[str, Any],
        *,
        fingerprint: str | None,
        lease_seconds: float,
        deadline_seconds: float | None = None,
    ) -> tuple[SagaState, bool]:
        try:
            return await self.claim(saga_id, lease_seconds=lease_seconds, name=name), False
        except SagaNotFoundError:
            pass
        with _storage_errors("starting the saga", saga_id):
            await self._storage.create_saga(saga_id, name, _plain(context))
            await self._storage.update_status(saga_id, SagaStatus.RUNNING)
            state = await self._state(saga_id, name)
        self.saga_id, self.version = saga_id, state.version
        self.fencing_token = state.version
        return state, True

    async def claim(
        self,
        saga_id: UUID,
        *,
        lease_seconds: float,
        count_attempt: bool = True,
        allow_parked: bool = False,
        name: str | None = None,
    ) -> SagaState:
        with _storage_errors("claiming the saga", saga_id):
            state = await self._state(saga_id)
        if name is not None and state.name and state.name != name:
            raise wrong_saga(saga_id, state.name, name)
        if state.status in TERMINAL_STATUSES or (
            state.status is SagaStatus.PARKED and not allow_parked
        ):
            return state
        if state.status is SagaStatus.WAITING:  # a wait is no interruption: no attempt counted
            with _storage_errors("claiming the saga", saga_id):
                await self._storage.update_status(saga_id, SagaStatus.RUNNING)
                state = await self._state(saga_id, state.name)
        elif count_attempt:
            new_status = SagaStatus.RUNNING if state.status is SagaStatus.PENDING else None
            with _storage_errors("claiming the saga", saga_id):
                await self._storage.increment_recovery_attempts(saga_id, new_status)
                state = await self._state(saga_id, state.name)
        self.saga_id, self.version = saga_id, state.version
        self.fencing_token = state.version
        return state

    async def renew_lease(self, lease_seconds: float) -> None:
        """No leases here."""

    async def release(self) -> None:
        """No leases here."""


@contextlib.contextmanager
def _storage_errors(doing: str, saga_id: UUID) -> Iterator[None]:
    """A custom storage's own error becomes a SagaStorageError (the cause kept), as sagakit's
    storages raise: callers handle one family whatever the storage."""
    try:
        yield
    except (SagaError, NotImplementedError):
        raise
    except Exception as error:
        raise SagaStorageError(
            f"saga {saga_id}: the storage failed while {doing} ({type(error).__name__}: "
            f"{error})", saga_id=saga_id) from error


def _plain(context: Mapping[str, Any]) -> dict[str, Any]:
    """A seed-style storage gets a plain dict, never the engine's ContextJSON."""
    return context.to_dict() if isinstance(context, ContextJSON) else dict(context)


async def _replay(target: Any, cp: Checkpoint) -> None:
    """Apply a checkpoint through seed-protocol calls: context, log entries, then status (a
    releasing wait's WAITING among them). Waits, pivots and attempt numbers have no call of
    their own: see the module docstring."""
    if cp.create_name is not None:
        await target.create_saga(cp.saga_id, cp.create_name, _plain(cp.context or {}))
    elif cp.context is not None:
        await target.update_context(cp.saga_id, _plain(cp.context), cp.expected_version)
    for e in cp.entries:
        details = e.details
        if e.attempt is not None:
            details = f"attempt {e.attempt}" if details is None else f"attempt {e.attempt}: {details}"
        await target.log_step(
            cp.saga_id, e.step_name, e.action.value, e.status, details, error_type=e.error_type
        )
    if cp.status is not None:
        await target.update_status(cp.saga_id, cp.status)
    if cp.reset_attempts and hasattr(target, "set_recovery_attempts"):
        await target.set_recovery_attempts(cp.saga_id, 0)


def open_run(storage: SagaStorage) -> AbstractAsyncContextManager[LeasedRun]:
    """The storage's own run if it has one, else a commit-per-call run over it (when
    ``create_run`` is missing, raises NotImplementedError or returns None)."""
    create_run = getattr(storage, "create_run", None)
    if create_run is not None:
        try:
            scope = create_run()
        except NotImplementedError:
            scope = None
        if scope is not None:
            return _NativeScope(storage, scope)
    return _compat_scope(storage)


class _NativeScope:
    """Enter the storage's own run scope; hand out its run, or — for a seed-style run without
    leases — a commit-per-call run driving it through its own ``commit()``."""

    __slots__ = ("_scope", "_storage")

    def __init__(self, storage: SagaStorage, scope: AbstractAsyncContextManager[Any]) -> None:
        self._storage = storage
        self._scope = scope

    async def __aenter__(self) -> LeasedRun:
        run = await self._scope.__aenter__()
        if hasattr(run, "start") and hasattr(run, "claim"):  # a LeasedRun (cheap check)
            return cast(LeasedRun, run)
        return CommitPerCallRun(self._storage, seed_run=run)

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._scope.__aexit__(*exc_info)


@asynccontextmanager
async def _compat_scope(storage: SagaStorage) -> AsyncIterator[LeasedRun]:
    run = CommitPerCallRun(storage)
    try:
        yield run
    finally:
        await run.rollback()
