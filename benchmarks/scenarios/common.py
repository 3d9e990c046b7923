"""What the sections share: sizes, the benchmark sagas, the run session (backends, unique table
names, cleanup, a cache of measurements), the closed-loop driver and the statement counter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import secrets
import statistics
import sys
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any

from sagakit import Saga, SagaContext, SagaStepHandler

# -- sizes ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each section does. ``total_for(c)`` sagas are measured at concurrency c."""

    memory_sagas: int
    memory_repeats: int
    rounds: int
    min_sagas: int
    concurrencies: tuple[int, ...]
    steps: tuple[int, ...]
    step_budget: int
    context_sizes: tuple[int, ...]
    context_sagas: int
    count_sagas: int
    recovery_backlog: int
    recovery_workers: tuple[int, ...]
    recovery_concurrency: int
    section_timeout: float
    dispatch_backlog: int
    dispatch_workers: tuple[int, ...]
    dispatch_rounds: int
    latency_sagas: int
    latency_rounds: int
    idle_warmup_s: float
    idle_window_s: float
    recovery_rounds: int = 1
    recovery_io_backlog: int = 100
    failover_trials: int = 5
    failover_lease_trials: int = 2

    def total_for(self, concurrency: int) -> int:
        return max(self.min_sagas, self.rounds * concurrency)


FULL = Sizes(
    memory_sagas=3000, memory_repeats=5, rounds=8, min_sagas=1024,
    concurrencies=(1, 8, 32, 128, 512), steps=(1, 5, 20, 100), step_budget=1500,
    context_sizes=(100, 10_000, 1_000_000), context_sagas=20, count_sagas=40,
    recovery_backlog=10_000, recovery_workers=(1, 2, 4), recovery_concurrency=8,
    section_timeout=900.0, dispatch_backlog=4000, dispatch_workers=(1, 2, 4), dispatch_rounds=3,
    latency_sagas=150, latency_rounds=3, idle_warmup_s=10.0, idle_window_s=20.0,
    recovery_rounds=2, recovery_io_backlog=2000, failover_trials=30, failover_lease_trials=8,
)
QUICK = Sizes(
    memory_sagas=300, memory_repeats=3, rounds=2, min_sagas=16,
    concurrencies=(1, 8, 32), steps=(1, 5, 20), step_budget=60,
    context_sizes=(100, 10_000, 1_000_000), context_sagas=3, count_sagas=8,
    recovery_backlog=200, recovery_workers=(1, 2, 4), recovery_concurrency=8,
    section_timeout=120.0, dispatch_backlog=100, dispatch_workers=(1, 2, 4), dispatch_rounds=1,
    latency_sagas=15, latency_rounds=1, idle_warmup_s=2.0, idle_window_s=4.0,
)

# -- the benchmark sagas --------------------------------------------------------------------------


@dataclasses.dataclass
class BenchContext(SagaContext):
    order_id: str
    counter: int = 0
    payload: str = ""


class Touch(SagaStepHandler[BenchContext, None]):
    """A no-op step that changes the context (one counter), so every checkpoint writes it."""

    async def act(self, context: BenchContext) -> None:
        context.counter += 1

    async def compensate(self, context: BenchContext) -> None:
        context.counter -= 1


class Keep(SagaStepHandler[BenchContext, None]):
    """A no-op step that leaves the context alone: its checkpoint should carry no context."""

    async def act(self, context: BenchContext) -> None:
        return None

    async def compensate(self, context: BenchContext) -> None:
        return None


class Sleepy(Touch):
    """A step that awaits ``sleep_s`` (a remote call's latency, no CPU), then changes the
    context."""

    sleep_s = 0.0

    async def act(self, context: BenchContext) -> None:
        await asyncio.sleep(self.sleep_s)
        context.counter += 1


_SAGAS: dict[tuple[int, bool, int], type[Saga[BenchContext]]] = {}


def saga_class(steps: int = 5, touch: bool = True,
               sleep_ms: int = 0) -> type[Saga[BenchContext]]:
    """A saga of ``steps`` no-op steps (``touch``: each changes the context; ``sleep_ms``:
    each first awaits that many milliseconds, and changes the context), built once per
    process under a name and fingerprint that every process builds alike."""
    key = (steps, touch, sleep_ms)
    cls = _SAGAS.get(key)
    if cls is None:
        base: type[SagaStepHandler[BenchContext, None]] = (
            Sleepy if sleep_ms else Touch if touch else Keep)
        kind = f"Sleep{sleep_ms}ms" if sleep_ms else "Touch" if touch else "Keep"
        extra = {"sleep_s": sleep_ms / 1000} if sleep_ms else {}
        step_types = [type(f"{kind}{steps}S{i}", (base,), dict(extra)) for i in range(steps)]
        cls = types.new_class(f"Bench{kind}{steps}", (Saga[BenchContext],), {},
                              lambda ns: ns.update(steps=step_types))
        _SAGAS[key] = cls
    return cls


def new_context(payload: str = "") -> BenchContext:
    return BenchContext("o", 0, payload)


async def run_saga(saga: Saga[BenchContext], storage: Any, payload: str = "") -> None:
    async for _ in saga.transaction(context=new_context(payload), storage=storage):
        pass


# -- results --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Measure:
    """One closed-loop measurement: ``sagas`` sagas by ``concurrency`` workers."""

    label: str
    sagas: int
    concurrency: int
    wall_s: float
    throughput: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    """Client (this process's) CPU time per saga, user + system."""
    errors: int = 0
    first_error: str | None = None
    batches_per_saga: float | None = None
    commits: float | None = None
    statements: float | None = None
    param_bytes: float | None = None


@dataclasses.dataclass
class Section:
    """A section's contribution to the report: markdown blocks and raw data."""

    title: str
    blocks: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    elapsed_s: float = 0.0
    status: str = "ok"

    def add(self, text: str) -> None:
        self.blocks.append(text.rstrip())


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[min(index, len(sorted_values) - 1)]


async def drive(
    label: str,
    one: Callable[[], Awaitable[None]],
    concurrency: int,
    total: int,
    warmup: int | None = None,
) -> Measure:
    """Run ``total`` sagas with ``concurrency`` concurrent workers (a closed loop: each worker
    starts its next saga when the last one ends), after ``warmup`` unmeasured sagas run the same
    way (default: four per worker, which also opens the pool's connections and lets each
    prepare its statements)."""
    # A warm-up long enough for every pooled connection to prepare its statements.
    await _loop(one, concurrency, warmup if warmup is not None else max(4 * concurrency, 64), [])
    latencies: list[float] = []
    errors: list[BaseException] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    await _loop(one, concurrency, total, latencies, errors)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    latencies.sort()
    done = len(latencies)
    return Measure(
        label=label, sagas=total, concurrency=concurrency, wall_s=wall,
        throughput=done / wall if wall > 0 else float("nan"),
        mean_ms=1000 * sum(latencies) / done if done else float("nan"),
        p50_ms=1000 * percentile(latencies, 0.50), p99_ms=1000 * percentile(latencies, 0.99),
        cpu_ms=1000 * cpu / max(done, 1), errors=len(errors),
        first_error=repr(errors[0])[:300] if errors else None,
    )


async def _loop(
    one: Callable[[], Awaitable[None]],
    concurrency: int,
    total: int,
    latencies: list[float],
    errors: list[BaseException] | None = None,
) -> None:
    remaining = [total]

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            start = time.perf_counter()
            try:
                await one()
            except Exception as exc:
                if errors is None:
                    raise
                errors.append(exc)
                if len(errors) > max(10, total // 10):
                    raise
                continue
            latencies.append(time.perf_counter() - start)

    workers = max(1, min(concurrency, total))
    await asyncio.gather(*(worker() for _ in range(workers)))


# -- counting what a storage sends ------------------------------------------------------------


# Counting is shared with the tests: one implementation of "what did the engine send".
from tests.integration.sqlcount import Counts, param_bytes  # noqa: E402,F401
from tests.integration.sqlcount import SqlCounter as Counter  # noqa: E402

# -- backends -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Backend:
    """A database server the benchmark can use."""

    name: str  # "postgres" | "mariadb"
    url: str
    version: str = ""
    settings: str = ""

    @property
    def label(self) -> str:
        return {"postgres": "PostgreSQL", "mariadb": "MariaDB",
                "sqlite": "SQLite (file)"}.get(self.name, self.name)


MODES = ("floor", "plain", "group")
"""floor: the raw driver alone; plain: sagakit's SQL storage; group: it with group_commit=True."""


class Session:
    """One benchmark run: its options, backends, table names, cleanup and measurement cache."""

    def __init__(self, sizes: Sizes, backends: dict[str, Backend], pool_cap: int,
                 quick: bool) -> None:
        self.sizes = sizes
        self.backends = backends
        self.pool_cap = pool_cap
        self.quick = quick
        self.run_id = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
        self._tables = 0
        self._storage_tables: list[tuple[str, dict[str, str]]] = []
        self._floor_tables: list[tuple[str, str]] = []
        self.cache: dict[tuple[Any, ...], Measure] = {}
        self.recovery_variants: list[str] | None = None
        """The recovery section's variants to run (None: all)."""
        self.recovery_mode = "process"
        """How the recovery section runs its workers: "process" (one subprocess each) or
        "inprocess" (asyncio.gather in this process)."""
        self.sections: dict[str, Section] = {}

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # -- tables ---------------------------------------------------------------------------------

    def new_tables(self, url: str) -> dict[str, str]:
        """Unique table names for one storage, remembered for the final clean-up."""
        self._tables += 1
        base = f"bx{self.run_id}_{self._tables}"
        tables = {"executions_table": f"{base}e", "logs_table": f"{base}l",
                  "queues_table": f"{base}q"}
        self._storage_tables.append((url, tables))
        return tables

    def new_floor_table(self, url: str) -> str:
        self._tables += 1
        name = f"bx{self.run_id}_{self._tables}f"
        self._floor_tables.append((url, name))
        return name

    def dropped(self, tables: dict[str, str] | str) -> None:
        """Forget tables already dropped, so the final clean-up does not drop them again."""
        if isinstance(tables, str):
            self._floor_tables = [x for x in self._floor_tables if x[1] != tables]
        else:
            self._storage_tables = [x for x in self._storage_tables if x[1] != tables]

    def storage(self, backend: Backend, *, group: bool = False, pool: int = 4) -> Any:
        from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

        pool = max(1, min(pool, self.pool_cap))
        return SqlAlchemySagaStorage.from_url(
            backend.url, group_commit=group, pool_size=pool, max_overflow=0, pool_timeout=120,
            **self.new_tables(backend.url),
        )

    async def drop_all(self) -> None:
        """Drop every table this run created (each measurement drops its own as it goes; this
        catches what a timeout or an error left behind). One engine per server."""
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        from sagakit.storage.schema import SagaTables

        urls = {url for url, _ in self._storage_tables} | {url for url, _ in self._floor_tables}
        for url in urls:
            engine = create_async_engine(url)
            try:
                for u, tables in self._storage_tables:
                    if u == url:
                        metadata = SagaTables(**tables).metadata
                        async with engine.begin() as conn:
                            await conn.run_sync(metadata.drop_all)
                for u, name in self._floor_tables:
                    if u == url:
                        async with engine.begin() as conn:
                            await conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
            except Exception as exc:
                self.log(f"could not drop this run's tables on {url}: {exc!r}")
            finally:
                await engine.dispose()
        self._storage_tables.clear()
        self._floor_tables.clear()

    # -- measurements -----------------------------------------------------------------------------

    async def measure(self, backend: Backend, mode: str, concurrency: int, *,
                      total: int | None = None, steps: int = 5) -> Measure:
        """Throughput, latency and client CPU of ``mode`` on ``backend`` at ``concurrency``
        (cached: sections asking for the same point share one measurement)."""
        total = total if total is not None else self.sizes.total_for(concurrency)
        key = (backend.name, mode, concurrency, total, steps)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        self.log(f"{backend.name} {mode} x{concurrency}: {total} sagas of {steps} steps")
        if mode == "floor":
            from scenarios.floor import measure_floor

            result = await measure_floor(self, backend, concurrency, total, steps=steps)
        else:
            result = await measure_sagakit(self, backend, mode == "group", concurrency, total,
                                           steps=steps)
        self.cache[key] = result
        return result


async def measure_sagakit(
    session: Session, backend: Backend, group: bool, concurrency: int, total: int, *,
    steps: int = 5, payload: str = "", touch: bool = True,
) -> Measure:
    """A closed-loop run of sagakit on its own fresh tables (dropped afterwards)."""
    storage = session.storage(backend, group=group, pool=concurrency)
    saga = saga_class(steps, touch)()
    await storage.create_schema()
    try:
        async def one() -> None:
            await run_saga(saga, storage, payload)

        batches0 = storage.group_commit.batches if group else 0
        label = f"sagakit {backend.name}{' group' if group else ''}"
        result = await drive(label, one, concurrency, total)
        if group:
            # The batches of the warm-up are included: it is short, and batches/saga is a ratio.
            result.batches_per_saga = (storage.group_commit.batches - batches0) / (
                total + concurrency)
        return result
    finally:
        await drop(session, storage)


async def drop(session: Session, storage: Any) -> None:
    """Drop a storage's tables and close it."""
    try:
        await storage.drop_schema()
        tables = {"executions_table": storage.tables.executions.name,
                  "logs_table": storage.tables.logs.name,
                  "queues_table": storage.tables.queues.name}
        session.dropped(tables)
    finally:
        await storage.close()


async def count_costs(
    session: Session, backend: Backend, group: bool, concurrency: int, sagas: int, *,
    steps: int = 5, payload: str = "", touch: bool = True,
) -> tuple[float, float, float]:
    """(commits, statements, parameter bytes) per saga, counted on a separate short run (the
    counting hooks cost client CPU, so timed runs go without them)."""
    storage = session.storage(backend, group=group, pool=concurrency)
    saga = saga_class(steps, touch)()
    await storage.create_schema()
    counter = Counter(storage.engine)
    try:
        async def one() -> None:
            await run_saga(saga, storage, payload)

        await _loop(one, concurrency, sagas, [])
        c = counter.counts
        return c.transactions / sagas, c.statements / sagas, c.param_bytes / sagas
    finally:
        await counter.aclose()
        await drop(session, storage)


# -- formatting -----------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def ratio(value: float | None, base: float | None, digits: int = 2) -> str:
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return "-"
    return f"{value / base:.{digits}f}x"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def spread(values: list[float]) -> dict[str, float]:
    """Median and range over rounds."""
    return ({"median": statistics.median(values), "min": min(values), "max": max(values)}
            if values else {"median": float("nan"), "min": float("nan"), "max": float("nan")})


def show(s: dict[str, float], digits: int = 0, bold: bool = False) -> str:
    """A median over rounds, its range in brackets (none when every round agreed)."""
    median = fmt(s["median"], digits)
    median = f"**{median}**" if bold else median
    if fmt(s["min"], digits) == fmt(s["max"], digits):
        return median
    return f"{median} ({fmt(s['min'], digits)}-{fmt(s['max'], digits)})"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**NOT met**")
