"""The sagas the crash-injection harness runs, and the events table their steps write to.

Two definitions share one context type (:class:`CrashContext`), the step names and the events:

- :class:`CrashSaga`: five compensable steps, no retries (the seed's all-or-nothing saga).
- :class:`ForwardSaga`: forward recovery (docs/forward-recovery.md). ``Reserve`` (compensable,
  retried), ``Charge`` (the pivot, retried), then ``Ship``, ``Notify``, ``Invoice`` (after the
  pivot: retried, no ``compensate``). The policies (:data:`FORWARD_RETRY`) wait tens of
  milliseconds, and the saga's ``durable_wait`` (:data:`DURABLE_WAIT`) makes some waits
  in-process and others durable (the saga rests WAITING; a recovery worker continues it).

Every ``act``/``compensate`` writes, into a separate ``events`` table of the same database and
committed at once (so it survives a SIGKILL):

- a ``start`` event with the attempt number sagakit gave the call and a *snapshot*: the saga's
  committed row (status, lease owner, ``next_attempt_at``, ``past_pivot``), its step log (with
  the log's ids and attempt numbers) and the database clock's "now", as one SELECT saw them
  when the call began;
- an ``end`` event (outcome ``ok`` or ``error:<type>``), unless the process died first;
- a ``crash`` event just before the process kills itself at an injected crash point;
- an ``interrupted`` event (outcome: the error's type) when a run of the saga stops on a lease
  or version conflict or a storage error (``SagaConcurrencyError``, ``SagaStorageError``:
  the lease lost or possibly run out, a liveness session lost, the database unreachable): the
  attempt in hand, its checkpoint not written, runs again (:class:`CrashObserver` sees it).

Events are ordered by the table's autoincrement id. An id is allocated when the INSERT runs, so
of two events A and B where A's INSERT returned before B's INSERT began, A has the smaller id: id
order agrees with real time for everything the checker compares.

What a saga does is read from its context: which definition runs it (``definition``), which act
fails for good (``fail_step``, and how: ``fail_mode``), which acts fail transiently first
(``act_transient``: step index -> failing attempts, counted durably in the events table), which
compensations fail transiently (``comp_transient``, counted likewise) or for good
(``comp_permanent``), and where the process kills itself (``crashes``). The crash points:

- ``act:k:start|mid|end`` and ``comp:k:start|mid|end``: at the start of step k's act or
  compensation (the previous checkpoint just committed), in its middle, or at its end (work
  done, checkpoint not yet written);
- ``retry:k:start|mid|end``: the same, inside a retried attempt (attempt >= 2); ``end`` also
  after a failed attempt, before its failure is checkpointed;
- ``wait:k``: during the in-process wait after a failed attempt of step k (its RETRYING
  checkpoint committed, the process asleep, lease held): a watcher task polls for that
  checkpoint and kills the process; should the wait end first, the next attempt kills it before
  doing anything (nothing is written in between, so the saga is in the same state);
- ``waiting:k``: right after the checkpoint of a durable wait of step k (the saga WAITING, no
  lease), when the run ends (seen by :class:`CrashObserver`, a middleware);
- ``pivot:before``: the pivot's act succeeded, its checkpoint not yet written;
  ``pivot:after``: the pivot's checkpoint committed (the next act's start event shows it).

Each crash point fires at most once per saga: the ``crash`` event is committed before the kill
and checked before firing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

from sagakit import (
    Retry,
    Saga,
    SagaConcurrencyError,
    SagaContext,
    SagaRun,
    SagaStatus,
    SagaStepHandler,
    SagaStorageError,
    Step,
    StepInvocation,
    current_invocation,
    permanent,
)
from sagakit.retry import is_permanent
from tests.acceptance.eventlog import EventLog

STEP_NAMES = ["Reserve", "Charge", "Ship", "Notify", "Invoice"]
INDEX = {name: i for i, name in enumerate(STEP_NAMES)}
CRASH_POINTS = ("start", "mid", "end")
PIVOT = 1
"""ForwardSaga's pivot: Charge."""
DURABLE_WAIT = 0.1
"""ForwardSaga's ``durable_wait``: a longer wait before the next attempt is durable."""


class StepFailed(Exception):
    """The configured failure of an act (the saga then compensates)."""


class Transient(ConnectionError):
    """A configured failure that a retry can fix (ForwardSaga retries only this)."""


class CompensationFailed(Exception):
    """A configured compensation failure (transient or permanent)."""


def _policy(attempts: int, delay: float, backoff: float) -> Retry:
    return Retry(attempts=attempts, delay=delay, backoff=backoff, retry_on=(Transient,))


FORWARD_RETRY: dict[str, Retry] = {
    "Reserve": _policy(3, 0.02, 8.0),  # waits 0.02 (in-process), 0.16 (durable)
    "Charge": _policy(4, 0.05, 3.0),  # 0.05, 0.15, 0.45
    "Ship": _policy(4, 0.03, 2.0),  # 0.03, 0.06, 0.12
    "Notify": _policy(3, 0.04, 1.0),  # 0.04, 0.04
    "Invoice": _policy(3, 0.2, 1.0),  # 0.2, 0.2
}
"""ForwardSaga's retry policies, by step (no jitter: the checker recomputes every wait)."""


def budget(definition: str, step: str) -> int:
    """How many attempts the definition gives the step's act."""
    return FORWARD_RETRY[step].attempts if definition == "ForwardSaga" else 1


def wait_before(step: str, attempt: int) -> float:
    """ForwardSaga's wait before ``attempt`` (2, 3, ...) of ``step``, recomputed here from the
    policy's numbers (the checker does not take sagakit's word for it)."""
    policy = FORWARD_RETRY[step]
    return min(policy.delay * policy.backoff ** (attempt - 2), policy.max_delay)


@dataclasses.dataclass
class CrashContext(SagaContext):
    key: str
    definition: str = "CrashSaga"
    fail_step: int | None = None
    fail_mode: str = "error"
    """How ``fail_step`` fails: ``error`` (StepFailed, CrashSaga), ``permanent`` (a Transient
    marked with ``sagakit.permanent``: never retried although the policy retries Transient),
    ``exhaust`` (Transient at every attempt)."""
    act_transient: dict[str, int] = dataclasses.field(default_factory=dict)
    comp_transient: dict[str, int] = dataclasses.field(default_factory=dict)
    comp_permanent: int | None = None
    crashes: list[str] = dataclasses.field(default_factory=list)
    step_ms: int = 20
    done: list[str] = dataclasses.field(default_factory=list)


_LOG: EventLog | None = None


def install(log: EventLog) -> None:
    """Make ``log`` the event log the steps of this process write to."""
    global _LOG
    _LOG = log


def _log() -> EventLog:
    if _LOG is None:
        raise RuntimeError("no event log installed in this process")
    return _LOG


async def _maybe_crash(saga_id: Any, context: CrashContext, point: str) -> None:
    """Kill this process with SIGKILL at ``point`` if the saga asks for it and it has not yet."""
    if point not in context.crashes:
        return
    log = _log()
    if await log.count(saga_id, "crash", outcome=point):
        return
    await log.record(saga_id, None, None, "crash", outcome=point)
    os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(3600)  # never reached


# -- crashes during waits (this process's bookkeeping) -------------------------------------------

_WAIT_ARMED: dict[tuple[str, int], int] = {}
"""(saga id, step index) -> the failed attempt whose in-process wait is to be cut off."""
_WAIT_FIRING: dict[tuple[str, int], asyncio.Event] = {}
"""The ``wait:k`` crashes being fired now (set once it turned out not to kill)."""
_LAST_FAILED: dict[str, tuple[int, CrashContext]] = {}
"""saga id -> (step index, context) of the last attempt that failed transiently here."""
_TASKS: set[asyncio.Task[None]] = set()


def _after_transient(saga_id: Any, context: CrashContext, k: int, attempt: int) -> None:
    """Note a transiently failed attempt; arm the ``wait:k`` crash if its wait is in-process."""
    sid = str(saga_id)
    _LAST_FAILED[sid] = (k, context)
    name = STEP_NAMES[k]
    if (f"wait:{k}" not in context.crashes or attempt >= FORWARD_RETRY[name].attempts
            or wait_before(name, attempt + 1) > DURABLE_WAIT):
        return
    _WAIT_ARMED[(sid, k)] = attempt
    task = asyncio.get_running_loop().create_task(_watch_wait(saga_id, context, k, attempt))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


async def _fire_wait_crash(saga_id: Any, context: CrashContext, k: int) -> None:
    key = (str(saga_id), k)
    _WAIT_ARMED.pop(key, None)
    firing = _WAIT_FIRING[key] = asyncio.Event()
    try:
        await _maybe_crash(saga_id, context, f"wait:{k}")
    finally:
        del _WAIT_FIRING[key]
        firing.set()


async def _watch_wait(saga_id: Any, context: CrashContext, k: int, attempt: int) -> None:
    """Kill this process once the failed attempt's RETRYING checkpoint is committed while the
    run sleeps, leased by this process (not if the wait turned durable: a shutdown)."""
    log, key, name = _log(), (str(saga_id), k), STEP_NAMES[k]
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up and _WAIT_ARMED.get(key) == attempt:
        snap = await log.snapshot(saga_id)
        if any(e[1] == name and e[2] == "act" and e[3] == "RETRYING" and e[4] == attempt
               for e in snap["log"]):
            if _WAIT_ARMED.get(key) != attempt:
                return  # the next attempt began meanwhile: it fires the crash itself
            if snap["status"] != "RUNNING" or f":{os.getpid()}:" not in (snap["owner"] or ""):
                _WAIT_ARMED.pop(key, None)
                return
            await _fire_wait_crash(saga_id, context, k)
            return
        await asyncio.sleep(0.003)


async def _before_attempt(saga_id: Any, context: CrashContext, k: int, attempt: int) -> None:
    """The ``wait:k`` crash, if armed and its watcher has not fired yet: the wait is over, the
    next attempt begins, nothing was written since the wait's checkpoint."""
    key = (str(saga_id), k)
    firing = _WAIT_FIRING.get(key)
    if firing is not None:  # the watcher is about to kill this process
        await firing.wait()
    armed = _WAIT_ARMED.get(key)
    if armed is not None and attempt > armed:
        await _fire_wait_crash(saga_id, context, k)


class CrashObserver:
    """The middleware of the harness's processes: passes every step invocation through, kills
    the process right after a run that ended at a durable wait (the saga WAITING) when the saga
    asks for ``waiting:k`` (k the step whose attempt failed), and records an ``interrupted``
    event when a run stops on a lease or version conflict or a storage error (see the module's
    docstring; a failure to record it changes nothing else)."""

    async def __call__(self, invocation: StepInvocation,
                       call_next: Callable[[StepInvocation], Awaitable[Any]]) -> Any:
        return await call_next(invocation)

    @contextlib.asynccontextmanager
    async def observe_saga(self, run: SagaRun) -> AsyncIterator[SagaRun]:
        try:
            yield run
        except (SagaConcurrencyError, SagaStorageError) as exc:
            with contextlib.suppress(Exception):
                await _log().record(run.saga_id, None, None, "interrupted",
                                    outcome=type(exc).__name__)
            raise
        failed = _LAST_FAILED.get(str(run.saga_id))
        if run.status is SagaStatus.WAITING and failed is not None:
            k, context = failed
            await _maybe_crash(run.saga_id, context, f"waiting:{k}")


# -- the steps -----------------------------------------------------------------------------------

class _Acting(SagaStepHandler[CrashContext, str]):
    """An act that records its events, fails and crashes as its saga's context says."""

    index: ClassVar[int] = 0

    async def act(self, context: CrashContext) -> str:
        invocation = current_invocation()
        assert invocation is not None
        saga_id, name, k, log = invocation.saga_id, type(self).__name__, self.index, _log()
        attempt = invocation.attempt
        try:  # a cancellation (a lease cut off) may land in the start record: end it all the same
            await _before_attempt(saga_id, context, k, attempt)
            await log.record(saga_id, name, "act", "start", attempt=attempt,
                             snapshot=await log.snapshot(saga_id))
            if name in context.done:  # the context already shows this act's effect
                await log.record(saga_id, name, "act", "anomaly",
                                 outcome="already in context.done")
            if any(d not in STEP_NAMES for d in context.done):
                await log.record(saga_id, name, "act", "anomaly",
                                 outcome="a failed attempt's change is in the context")
            await self._crash_point(saga_id, context, "start", attempt)
            if k == PIVOT + 1:
                await _maybe_crash(saga_id, context, "pivot:after")
            await asyncio.sleep(random.uniform(0, context.step_ms / 1000))
            await self._crash_point(saga_id, context, "mid", attempt)
            await asyncio.sleep(random.uniform(0, context.step_ms / 2000))
            failure = await self._failure(saga_id, context, name, attempt)
            if failure is not None:
                raise failure
            await log.record(saga_id, name, "act", "end", outcome="ok", attempt=attempt)
        except BaseException as exc:
            await log.record(saga_id, name, "act", "end", outcome=f"error:{type(exc).__name__}",
                             attempt=attempt)
            if isinstance(exc, Transient) and not is_permanent(exc):
                if attempt < budget(context.definition, name):
                    context.done.append(f"{name}~{attempt}")  # sagakit must drop it
                _after_transient(saga_id, context, k, attempt)
                if attempt >= 2:
                    await _maybe_crash(saga_id, context, f"retry:{k}:end")
            raise
        await self._crash_point(saga_id, context, "end", attempt)
        if k == PIVOT:
            await _maybe_crash(saga_id, context, "pivot:before")
        # Last, once nothing of this act can fail (the event log's writes can): a failed act's
        # change to the context stays in the context its FAILED checkpoint writes (as
        # documented), and would then not match the log.
        context.done.append(name)
        return name

    async def _crash_point(self, saga_id: Any, context: CrashContext, where: str,
                           attempt: int) -> None:
        await _maybe_crash(saga_id, context, f"act:{self.index}:{where}")
        if attempt >= 2:
            await _maybe_crash(saga_id, context, f"retry:{self.index}:{where}")

    async def _failure(self, saga_id: Any, context: CrashContext, name: str,
                       attempt: int) -> Exception | None:
        """The error this attempt fails with, as configured, or None."""
        if context.fail_step == self.index:
            if context.fail_mode == "exhaust":
                return Transient(f"{name} fails at every attempt (configured)")
            if context.fail_mode == "permanent":
                return permanent(Transient(f"{name} is refused for good (configured)"))
            return StepFailed(f"{name} fails (configured)")
        transient = context.act_transient.get(str(self.index), 0)
        if transient and await _log().count(saga_id, "end", step=name, action="act",
                                            outcome="error:Transient") < transient:
            return Transient(f"{name} fails for now (configured, attempt {attempt})")
        return None


class _CrashStep(_Acting):
    async def compensate(self, context: CrashContext) -> None:
        invocation = current_invocation()
        assert invocation is not None
        saga_id, name, k, log = invocation.saga_id, type(self).__name__, self.index, _log()
        try:  # as in act: an end event even when the start record was cut off
            await log.record(saga_id, name, "compensate", "start", attempt=invocation.attempt,
                             snapshot=await log.snapshot(saga_id))
            await _maybe_crash(saga_id, context, f"comp:{k}:start")
            await asyncio.sleep(random.uniform(0, context.step_ms / 1000))
            await _maybe_crash(saga_id, context, f"comp:{k}:mid")
            if context.comp_permanent == k:
                raise CompensationFailed(f"{name} cannot be compensated (configured)")
            transient = context.comp_transient.get(str(k), 0)
            if transient and await log.count(saga_id, "end", step=name, action="compensate",
                                             outcome="error:CompensationFailed") < transient:
                raise CompensationFailed(f"{name} compensation fails for now (configured)")
        except BaseException as exc:
            await log.record(saga_id, name, "compensate", "end",
                             outcome=f"error:{type(exc).__name__}")
            raise
        if name not in context.done:  # the context does not show the effect this undoes
            await log.record(saga_id, name, "compensate", "anomaly",
                             outcome="not in context.done")
        await log.record(saga_id, name, "compensate", "end", outcome="ok")
        await _maybe_crash(saga_id, context, f"comp:{k}:end")
        if name in context.done:  # last, as in act
            context.done.remove(name)


class Reserve(_CrashStep):
    index = 0


class Charge(_CrashStep):
    index = 1


class Ship(_CrashStep):
    index = 2


class Notify(_CrashStep):
    index = 3


class Invoice(_CrashStep):
    index = 4


class CrashSaga(Saga[CrashContext]):
    steps = [Reserve, Charge, Ship, Notify, Invoice]


def _after_pivot(index: int, **options: Any) -> type[_Acting]:
    """A ForwardSaga step after the pivot: named like CrashSaga's, no ``compensate``."""
    name = STEP_NAMES[index]
    handler: type[_Acting] = type(name, (_Acting,), {
        "index": index, "__module__": __name__, "__qualname__": name, **options})
    return handler


class ForwardSaga(Saga[CrashContext]):
    """Options set three ways: Step(...) overrides (Reserve, Charge), handler class attributes
    (Ship, Invoice), the saga's default (Notify)."""

    retry = FORWARD_RETRY["Notify"]
    durable_wait = DURABLE_WAIT
    steps = [
        Step(Reserve, retry=FORWARD_RETRY["Reserve"]),
        Step(Charge, retry=FORWARD_RETRY["Charge"], pivot=True),
        _after_pivot(2, retry=FORWARD_RETRY["Ship"]),
        _after_pivot(3),
        _after_pivot(4, retry=FORWARD_RETRY["Invoice"]),
    ]


DEFINITIONS: dict[str, type[Saga[CrashContext]]] = {
    "CrashSaga": CrashSaga, "ForwardSaga": ForwardSaga}
