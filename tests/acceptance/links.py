"""The crash-injection harness's partition mode: a faulty network link between each worker and
the database (see :mod:`tests.acceptance.harness`).

:class:`Links` gives every worker process a :class:`~tests.acceptance.faultproxy.FaultProxy` of
its own (:meth:`Links.open`: the database URL with the proxy's host and port) and injects
``count`` faults, alternately a *cut* (every connection reset, new ones refused, for
:data:`CUT_SECONDS`, then healed) and a *stall* (nothing forwarded, for a time drawn alternately
shorter than the lease and longer than it, then healed). When, and which worker, is drawn from
the run's seeded random generator; a worker in the middle of an act or a compensation (its
events show a start without an end) is preferred, then one that holds a saga (see
:meth:`Links.choose`). At least one worker's link is always up. A fault on a worker that exits
ends with its proxy (:meth:`Links.drop`), which resets its connections.

Every fault is recorded as a ``fault`` event (no saga; label and pid the worker's) whose outcome
is ``<cut|stall>:<seconds>:<sagas it held>`` (RUNNING or COMPENSATING, its pid in the lease
owner, just before the fault); its end, a ``heal`` event (or the worker's ``exit``).
:func:`fault_counts` reads them back for the report.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.acceptance.checker import INFINITY, Event
from tests.acceptance.faultproxy import FaultProxy

__all__ = ["CUT_SECONDS", "LONG_STALL", "PATIENCE", "SHORT_STALL", "Fault", "Links",
           "fault_counts", "held_by_pid", "leases", "link_faults"]

CUT_SECONDS = (0.5, 3.0)
"""How long a cut lasts (drawn uniformly)."""
LONG_STALL = (1.5, 3.0)
SHORT_STALL = (0.2, 0.8)
"""How long a stall lasts, in leases: the first and every other one longer than the lease, the
rest shorter."""
PATIENCE = (0.0, 1.0, 5.0)
"""Seconds a due fault waits before it takes a worker in the middle of a step, one that holds
a saga, any."""
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


@dataclasses.dataclass
class Fault:
    """A fault on a worker's link: ``kind`` (``cut`` or ``stall``), for ``seconds``, healed at
    ``heal_at`` (the harness's monotonic clock)."""

    kind: str
    label: str
    seconds: float
    heal_at: float


class Links:
    """The proxies of one run's workers, and the faults injected into them (see the module's
    docstring). ``url`` is the database's; ValueError for SQLite, which has no network link.
    ``every`` is the range of seconds between two faults."""

    def __init__(self, url: str, count: int, lease: float, rng: random.Random,
                 every: tuple[float, float]) -> None:
        self.url = make_url(url)
        backend = self.url.get_backend_name()
        if backend not in _DEFAULT_PORTS:
            raise ValueError(f"partition mode: no network link to {backend}")
        self.host = self.url.host or "127.0.0.1"
        self.port = self.url.port or _DEFAULT_PORTS[backend]
        self.count, self.lease, self.rng, self.every = count, lease, rng, every
        self.proxies: dict[str, FaultProxy] = {}
        self.faults: dict[str, Fault] = {}  # label -> the fault its link is in now
        self.injected = 0
        self.next_at: float | None = None
        self.due_since: float | None = None
        self.open_steps: dict[str, set[tuple[str, str, str]]] = {}  # label -> its open steps
        self.cursor = 0  # the last event id read into open_steps

    def open(self) -> tuple[FaultProxy, str]:
        """Start a proxy, and return it with the URL that reaches the database through it (give
        it to a worker, then :meth:`attach` the proxy to the worker's label)."""
        proxy = FaultProxy(self.host, self.port).start()
        return proxy, self.url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False)

    def attach(self, label: str, proxy: FaultProxy) -> None:
        self.proxies[label] = proxy

    def drop(self, label: str) -> None:
        """Close ``label``'s proxy (its process exited), ending any fault on it."""
        self.faults.pop(label, None)
        self.open_steps.pop(label, None)
        proxy = self.proxies.pop(label, None)
        if proxy is not None:
            proxy.close()

    def heal_all(self) -> list[str]:
        """End every fault now, and inject no more; the labels healed."""
        self.count = self.injected
        return self.heal_due(float("inf"))

    def close(self) -> None:
        for label in list(self.proxies):
            self.drop(label)

    def heal_due(self, now: float) -> list[str]:
        """End the faults due to end by ``now``; the labels healed."""
        healed = [label for label, fault in self.faults.items() if now >= fault.heal_at]
        for label in healed:
            self.proxies[label].heal()
            del self.faults[label]
        return healed

    def due(self, now: float) -> bool:
        """Whether a fault is to be injected now (the first ``every`` after the first call)."""
        if self.injected >= self.count:
            return False
        if self.next_at is None:
            self.next_at = now + self.rng.uniform(*self.every)
        if now < self.next_at:
            return False
        if self.due_since is None:
            self.due_since = now
        return True

    def read_events(self, rows: Iterable[Any]) -> None:
        """Note the act/compensate starts and ends of events read since the last call (rows
        with id, label, saga_id, step, action, phase; ordered by id)."""
        for r in rows:
            self.cursor = max(self.cursor, r.id)
            if r.phase not in ("start", "end") or r.step is None or r.label not in self.proxies:
                continue
            steps = self.open_steps.setdefault(r.label, set())
            key = (r.saga_id, r.step, r.action)
            if r.phase == "start":
                steps.add(key)
            else:
                steps.discard(key)

    def choose(self, now: float, live: Sequence[str], held: dict[str, int]) -> str | None:
        """The worker to fault now, among ``live`` (labels; ``held``: how many sagas each
        holds): one in a step if any; after waiting a while (:data:`PATIENCE`), one that holds
        a saga; after a longer while, any. None to wait (also when faulting one would leave no
        link up)."""
        up = sorted(label for label in live if label in self.proxies
                    and label not in self.faults)
        if len(up) < 2:
            return None
        assert self.due_since is not None
        waited = now - self.due_since
        tiers = [[label for label in up if self.open_steps.get(label)],
                 [label for label in up if held.get(label)], up]
        for patience, tier in zip(PATIENCE, tiers, strict=True):
            if tier and waited >= patience:
                return self.rng.choice(tier)
        return None

    def inject(self, label: str, now: float) -> Fault:
        """Cut or stall ``label``'s link (alternately) until a drawn time."""
        proxy = self.proxies[label]
        if self.injected % 2 == 0:
            fault = Fault("cut", label, self.rng.uniform(*CUT_SECONDS), 0.0)
            proxy.cut()
        else:
            stall = LONG_STALL if self.injected % 4 == 1 else SHORT_STALL
            fault = Fault("stall", label, self.lease * self.rng.uniform(*stall), 0.0)
            proxy.stall()
        fault.heal_at = now + fault.seconds
        self.faults[label] = fault
        self.injected += 1
        self.next_at = now + self.rng.uniform(*self.every)
        self.due_since = None
        return fault

    def in_step(self, label: str) -> int:
        """How many acts and compensations ``label`` is in, as its events read so far show."""
        return len(self.open_steps.get(label, ()))


def leases(executions: sa.Table) -> sa.Select[Any]:
    """The lease owners of the sagas held now (RUNNING or COMPENSATING)."""
    return sa.select(executions.c.lease_owner).where(
        executions.c.status.in_(["RUNNING", "COMPENSATING"]),
        executions.c.lease_owner.is_not(None))


def held_by_pid(owners: Iterable[str]) -> Counter[int]:
    """How many of the leases of ``owners`` (``host:pid:...`` or ``~host:pid:...``) each
    process holds."""
    pids = (owner.rsplit(":", 2)[1] for owner in owners if owner.count(":") >= 2)
    return Counter(int(pid) for pid in pids if pid.isdigit())


def link_faults(events: Sequence[Event]) -> list[tuple[Event, float]]:
    """Each ``fault`` event of a run (events ordered by id) and the id of the event that ended
    it: the faulted process's next ``heal`` or ``exit`` event (infinity if none)."""
    out: list[tuple[Event, float]] = []
    for i, fault in enumerate(events):
        if fault.phase == "fault":
            end = next((e.id for e in events[i + 1:] if e.label == fault.label
                        and e.phase in ("heal", "exit")), INFINITY)
            out.append((fault, end))
    return out


def fault_counts(events: Sequence[Event], lease: float) -> dict[str, int]:
    """The faults of a run, from its events (ordered by id): ``cuts`` and ``stalls``, and of
    each kind those of a worker that held a saga (``cuts_holding``...), that was in the middle
    of an act or compensation (``_in_step``: one of its starts has no end before the fault),
    and the sagas ``_taken_over`` while the link was down (the faulted worker ran the saga's
    last step started before the fault, another process the first one started after it, before
    the ``heal`` or ``exit`` event of the faulted worker); and ``long_stalls``, longer than the
    lease."""
    counts: Counter[str] = Counter()
    starts: dict[str, list[Event]] = {}
    for e in events:
        if e.saga_id is not None and e.phase == "start":
            starts.setdefault(e.saga_id, []).append(e)
    for fault, end in link_faults(events):
        if not fault.outcome:
            continue
        kind, seconds, held = fault.outcome.split(":")
        name = "cuts" if kind == "cut" else "stalls"
        counts[name] += 1
        counts[f"{name}_holding"] += int(held) > 0
        counts[f"{name}_in_step"] += bool(_open_steps(
            e for e in events if e.label == fault.label and e.id < fault.id))
        counts[f"{name}_taken_over"] += sum(
            _taken_over(saga, fault, end) for saga in starts.values())
        counts["long_stalls"] += kind == "stall" and float(seconds) > lease
    return dict(counts)


def _open_steps(events: Iterable[Event]) -> set[tuple[str | None, str | None, str | None]]:
    """The acts and compensations started and not ended in ``events`` (one process's)."""
    open_: set[tuple[str | None, str | None, str | None]] = set()
    for e in events:
        if e.phase == "start":
            open_.add((e.saga_id, e.step, e.action))
        elif e.phase == "end":
            open_.discard((e.saga_id, e.step, e.action))
    return open_


def _taken_over(starts: Sequence[Event], fault: Event, end: float) -> bool:
    before = [e for e in starts if e.id < fault.id]
    after = next((e for e in starts if e.id > fault.id), None)
    return (bool(before) and before[-1].label == fault.label and after is not None
            and after.label != fault.label and after.id < end)
