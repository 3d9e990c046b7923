"""The MySQL/MariaDB hot path: checkpoints and saga starts sent through the driver's own
connection (asyncmy or aiomysql) on a pooled connection
(:class:`~sagakit.storage.pool.PoolLease`), without SQLAlchemy's per-statement cost.

Both drivers connect with multi-statements enabled (``CLIENT_MULTI_STATEMENTS``), so the
statements of one write travel as one query, ending in ``COMMIT``: one round trip.

- A checkpoint: each log entry's ``INSERT ... SELECT ... FROM`` the saga's row ``WHERE`` the
  fence matches ``FOR UPDATE`` (the first locks the row: nothing can change it until the
  commit); the fenced ``UPDATE``; ``COMMIT``. Both or neither: the fence is read on the locked
  row by every statement. Not ``ROW_COUNT()`` after the UPDATE: should the client vanish
  mid-query (a SIGKILL, a reset link), the server still runs the statements through to the
  ``COMMIT``, and then ``ROW_COUNT()`` is not always the UPDATE's (measured: the UPDATE
  committed, its log entries not).
- A start: ``INSERT``, ``COMMIT``.
- A batch (group commit): ``SELECT ... FOR UPDATE`` locks the rows of the batch's sagas (in
  saga id order, as every writer does) and reads their versions; one ``INSERT`` of the started
  sagas; one ``INSERT ... SELECT`` of the log entries of the sagas whose fence matches their
  locked row; one ``UPDATE`` of those same sagas (the same fence, a ``CASE`` per column); a
  ``SELECT`` of the versions after; ``COMMIT``. A saga was written if and only if its version
  moved by one: the database alone decides, against rows nobody else can change meanwhile.

Values are escaped by the driver, as its own ``cursor.execute(sql, args)`` does. When a statement
fails, the server runs none of the ones after it, and the transaction is rolled back (a second
round trip, on that path only); a connection the driver lost, or a query cut off by
cancellation, is invalidated instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from sagakit.exceptions import SagaSerializationError
from sagakit.storage.pool import LeasedStart, PoolLease
from sagakit.storage.run import Checkpoint, PendingEntry
from sagakit.storage.schema import SagaTables

__all__ = ["MySqlWriter"]

_NOW = "UTC_TIMESTAMP(6)"
_PACKET_MARGIN = 1024  # the packet's header and the server's own bookkeeping
_SMALL_QUERY = 1 << 20
"""Queries up to this size are sent without asking the server for its max_allowed_packet
(MySQL's default is 64 MiB, MariaDB's 16 MiB; neither allows less than 1 KiB, but a server set
below 1 MiB is not supported)."""
_DUPLICATE_KEY = 1062
_FENCED_OUT = 1690  # "DOUBLE value is out of range": the batch's fence check, see _add_writes
_Literal = Callable[[Any], str]


class MySqlWriter:
    """The MySQL/MariaDB statements of one set of tables."""

    def __init__(self, tables: SagaTables) -> None:
        ex, logs = tables.executions.name, tables.logs.name
        self._ex = ex
        self._update = f"UPDATE {ex} SET version = version + 1, updated_at = {_NOW}"
        self._insert = (
            f"INSERT INTO {ex} (saga_id, name, status, context, version, recovery_attempts, "
            "fingerprint, lease_owner, lease_expires_at, created_at, updated_at, deadline_at) "
            "VALUES ")
        self._log = (f"INSERT INTO {logs} (saga_id, step_name, action, status, details, "
                     "error_type, attempt, created_at) ")
        self._lock = f"SELECT saga_id, version, lease_owner FROM {ex} WHERE saga_id IN "
        self.max_packet: int | None = None
        """The server's ``max_allowed_packet`` (read once): no query is sent that exceeds it."""

    async def _send(self, raw: Any, query: _Query, saga_id: UUID | None = None
                    ) -> dict[str, Any]:
        if self.max_packet is None and query.size_bound() > _SMALL_QUERY:
            # Read once, and only for a large query: the usual small ones cost no extra read.
            self.max_packet = int((await _execute(raw, "SELECT @@max_allowed_packet"))[0][0][0])
        return await query.commit(raw, self.max_packet or _SMALL_QUERY, saga_id)

    # -- one saga -------------------------------------------------------------------------------

    async def write_checkpoint(self, lease: PoolLease, cp: Checkpoint, text: str | None) -> int | None:
        """Write one update checkpoint; return the new version, or None when the fence did not
        match (nothing written; the caller finds out why). Driver errors propagate after the
        rollback."""
        raw = lease.driver
        lit: _Literal = raw.literal
        sid = _sid(cp.saga_id)
        fence = _fence(cp, lit)
        query = _Query()
        for i, e in enumerate(cp.entries):  # first: each locks the row if the fence matches
            query.add(f"log{i}", f"{self._log}SELECT {_entry(sid, e, lit)}, {_NOW} FROM "
                                 f"{self._ex} WHERE saga_id = {sid} AND {fence} FOR UPDATE")
        query.add("update", f"{self._update}{_sets(cp, text, lit)} WHERE saga_id = {sid} AND {fence}")
        known = cp.fence_version if cp.fence_version is not None else cp.expected_version
        if known is None:  # read the version back, under the row lock the update took
            query.add("version", f"SELECT version FROM {self._ex} WHERE saga_id = {sid}")
        async with _Guard(lease):
            results = await self._send(raw, query, cp.saga_id)
        if results["update"] != 1:
            return None
        _check(sum(results[f"log{i}"] for i in range(len(cp.entries))), len(cp.entries))
        return known + 1 if known is not None else int(results["version"][0][0])

    async def insert_leased(self, lease: PoolLease, start: LeasedStart) -> bool:
        """Insert the saga RUNNING and leased; False, with nothing written, if the id exists."""
        raw = lease.driver
        try:
            async with _Guard(lease):
                query = _Query()
                query.add("start", self._insert + _start_row(start, raw.literal))
                await self._send(raw, query, start.saga_id)
        except Exception as error:
            if _error_code(error) == _DUPLICATE_KEY:
                return False
            raise
        return True

    # -- group commit ---------------------------------------------------------------------------

    async def write_batch(
        self, lease: PoolLease, items: list[tuple[Checkpoint, str | None]],
        starts: list[LeasedStart],
    ) -> tuple[list[int | None], list[bool]]:
        """Write the update checkpoints of distinct sagas and insert the started sagas, in one
        transaction. Returns, in the order given, each checkpoint's new version (None when its
        fence did not match: nothing of it was written) and whether each start was inserted
        (always: a duplicate start id fails the whole batch, with nothing written, and the
        caller then writes each alone; so does a driver error).

        First in one round trip, as if every fence matched (the usual case): the fenced UPDATE
        must change every row, else the query stops before its COMMIT. If it did stop there,
        the batch is written again the exact way: lock and read the rows, and write only the
        checkpoints whose fence matches (two round trips)."""
        raw = lease.driver
        lit: _Literal = raw.literal
        sids = [f"'{cp.saga_id.hex}'" for cp, _ in items]
        try:
            async with _Guard(lease):
                versions = await self._write_all(raw, sids, items, starts, lit)
        except Exception as error:
            if _error_code(error) != _FENCED_OUT:
                raise
            async with _Guard(lease):
                versions = await self._write_matching(raw, sids, items, starts, lit)
        return versions, [True] * len(starts)

    async def _write_all(
        self, raw: Any, sids: list[str], items: list[tuple[Checkpoint, str | None]],
        starts: list[LeasedStart], lit: _Literal,
    ) -> list[int | None]:
        """One round trip, all or nothing: raises the driver's error ``_FENCED_OUT``, before
        anything is committed, when a fence does not match."""
        query = self._starts(starts, lit)
        unknown = [sid for sid, (cp, _) in zip(sids, items, strict=True) if _known(cp) is None]
        if items:
            writes = [(sid, cp, text) for sid, (cp, text) in zip(sids, items, strict=True)]
            self._add_writes(query, writes, lit, fenced=True)
        if unknown:
            query.add("versions", f"{self._lock}({', '.join(unknown)})")
        results = await self._send(raw, query)
        read = {_hex(row[0]): row[1] for row in results.get("versions", ())}
        _check(results.get("logs", 0), sum(len(cp.entries) for cp, _ in items))
        _check(results.get("starts", 0), len(starts))
        return [known + 1 if (known := _known(cp)) is not None else read[cp.saga_id.hex]
                for cp, _ in items]

    async def _write_matching(
        self, raw: Any, sids: list[str], items: list[tuple[Checkpoint, str | None]],
        starts: list[LeasedStart], lit: _Literal,
    ) -> list[int | None]:
        """Two round trips: lock and read the rows (in saga id order, as every writer locks
        them), then write the checkpoints whose fence matches."""
        versions: list[int | None] = [None] * len(items)
        query = self._starts(starts, lit)
        rows = (await _execute(
            raw, f"{self._lock}({', '.join(sids)}) ORDER BY saga_id FOR UPDATE"))[0]
        locked = {_hex(row[0]): row for row in rows}
        matched: list[tuple[str, Checkpoint, str | None]] = []
        for i, (cp, text) in enumerate(items):
            row = locked.get(sids[i][1:-1])
            if row is not None and _fits(cp, row):
                versions[i] = row[1] + 1
                matched.append((sids[i], cp, text))
        if matched:
            self._add_writes(query, matched, lit, fenced=False)
        results = await self._send(raw, query)
        _check(results.get("update", 0), len(matched))
        _check(results.get("logs", 0), sum(len(cp.entries) for _, cp, _ in matched))
        _check(results.get("starts", 0), len(starts))
        return versions

    def _starts(self, starts: list[LeasedStart], lit: _Literal) -> _Query:
        query = _Query()
        if starts:
            query.add("starts", self._insert + ", ".join(_start_row(s, lit) for s in starts))
        return query

    def _add_writes(
        self, query: _Query, matched: list[tuple[str, Checkpoint, str | None]], lit: _Literal,
        *, fenced: bool,
    ) -> None:
        """Add the UPDATE of the given sagas (a ``CASE`` on the saga id for each column that
        some of them change) and the INSERT of their log entries. With ``fenced``, the UPDATE
        changes each row only if its checkpoint's fence matches, and the query stops unless it
        changed every one."""
        context: list[str] = []
        status: list[str] = []
        reset: list[str] = []
        release: list[str] = []
        ends: list[str] = []
        waits: list[str] = []
        pivots: list[str] = []
        fences: list[str] = []
        logs: list[str] = []
        for sid, cp, text in matched:
            if text is not None:
                context.append(f"WHEN {sid} THEN {lit(text)}")
            if cp.status is not None:
                status.append(f"WHEN {sid} THEN '{cp.status.value}'")
            if cp.reset_attempts:
                reset.append(sid)
            if cp.releases_lease:
                release.append(sid)
                ends.append(f"WHEN {sid} THEN NULL")
            elif cp.lease_seconds is not None:
                ends.append(f"WHEN {sid} THEN {_later(cp.lease_seconds)}")
            if cp.wait_seconds is not None:
                waits.append(f"WHEN {sid} THEN {_later(cp.wait_seconds)}")
            elif cp.clear_wait:
                waits.append(f"WHEN {sid} THEN NULL")
            if cp.past_pivot:
                pivots.append(sid)
            if fenced:
                fences.append(f"WHEN {sid} THEN {_fence(cp, lit)}")
            logs.extend(f"({_entry(sid, e, lit)}, {_NOW})" for e in cp.entries)
        sets = [self._update]
        if context:
            sets.append(f"context = CASE saga_id {' '.join(context)} ELSE context END")
        if status:
            sets.append(f"status = CASE saga_id {' '.join(status)} ELSE status END")
        if reset:
            sets.append(f"recovery_attempts = IF(saga_id IN ({', '.join(reset)}), 0, "
                        "recovery_attempts)")
        if ends:
            sets.append(f"lease_expires_at = CASE saga_id {' '.join(ends)} "
                        "ELSE lease_expires_at END")
        if release:
            sets.append(f"lease_owner = IF(saga_id IN ({', '.join(release)}), NULL, lease_owner)")
        if waits:
            sets.append(f"next_attempt_at = CASE saga_id {' '.join(waits)} "
                        "ELSE next_attempt_at END")
        if pivots:
            sets.append(f"past_pivot = IF(saga_id IN ({', '.join(pivots)}), TRUE, past_pivot)")
        where = f"saga_id IN ({', '.join(sid for sid, _, _ in matched)})"
        if fenced:
            where += f" AND CASE saga_id {' '.join(fences)} END"
        query.add("update", f"{', '.join(sets)} WHERE {where}")
        if fenced:
            # Right after the UPDATE: 0 if it changed every row; else EXP(1000) raises "DOUBLE
            # value is out of range" (_FENCED_OUT), which stops the query before its COMMIT.
            # (IF evaluates only the branch it takes.) Safe though ROW_COUNT() may be wrong
            # once the client has vanished (see the module's docstring): it can only be wrong
            # that way, stopping the query, and an error stops the statements after it then
            # too (measured).
            query.add("all", f"SELECT IF(ROW_COUNT() <> {len(matched)}, EXP(1000), 0)")
        if logs:
            query.add("logs", self._log + "VALUES " + ", ".join(logs))


class _Guard:
    """``async with _Guard(lease)``: if the block fails, roll back the transaction it left
    open; if the driver lost the connection, or the block was cancelled mid-query (the
    connection may still owe a reply), invalidate the connection instead."""

    __slots__ = ("lease",)

    def __init__(self, lease: PoolLease) -> None:
        self.lease = lease

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        raw = self.lease.driver
        usable = isinstance(exc, Exception) and _is_open(raw)
        if usable:
            try:
                await raw.rollback()
            except Exception:  # out of sync, or lost meanwhile: never hand it out again
                usable = False
        if not usable:
            await self.lease.invalidate()


class _Query:
    """Statements sent as one query, in one transaction, ending in ``COMMIT``; each named, so
    its result can be found by name."""

    __slots__ = ("names", "statements")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.statements: list[str] = []

    def add(self, name: str, statement: str) -> None:
        self.names.append(name)
        self.statements.append(statement)

    def size_bound(self) -> int:
        """At least the size in bytes of the query :meth:`commit` sends (UTF-8: at most four
        bytes a character)."""
        return 4 * (sum(map(len, self.statements)) + 32) + _PACKET_MARGIN

    async def commit(self, raw: Any, max_packet: int, saga_id: UUID | None = None
                     ) -> dict[str, Any]:
        """Send the statements and COMMIT; each statement's result by name (see
        :func:`_execute`). On a connection in autocommit mode (an engine made with
        ``isolation_level="AUTOCOMMIT"``) a BEGIN goes first, so they stay one transaction.

        A query larger than the server's ``max_allowed_packet`` is not sent (the server would
        drop the connection): SagaSerializationError, nothing written."""
        statements = [*self.statements, "COMMIT"]
        names = self.names
        if raw.get_autocommit():
            statements.insert(0, "BEGIN")
            names = ["begin", *names]
        sql = ";\n".join(statements)
        if self.size_bound() > max_packet:  # else it fits whatever its characters
            size = len(sql.encode()) + _PACKET_MARGIN
            if size > max_packet:
                whose = f"saga {saga_id}: " if saga_id is not None else ""
                raise SagaSerializationError(
                    f"{whose}a write of {size} bytes is larger than the database server's "
                    f"max_allowed_packet ({max_packet} bytes); store less in the context or "
                    "raise max_allowed_packet", saga_id=saga_id)
        results = await _execute(raw, sql)
        return dict(zip(names, results, strict=False))


async def _execute(raw: Any, sql: str) -> list[Any]:
    """Send ``sql`` (statements separated by ``;``) as one query; each statement's result: its
    rows for a SELECT, else its row count. A failing statement raises once the results before
    it are read."""
    async with raw.cursor() as cursor:
        count = await cursor.execute(sql)
        results = [await cursor.fetchall() if cursor.description else count]
        while await cursor.nextset():
            results.append(await cursor.fetchall() if cursor.description else cursor.rowcount)
    return results


def _check(count: int, expected: int) -> None:
    """A committed statement changed the rows planned; anything else is a bug worth an error."""
    if count != expected:
        raise RuntimeError(f"sagakit: a MySQL statement changed {count} rows, not {expected}")


def _known(cp: Checkpoint) -> int | None:
    """The version a checkpoint expects its saga to have (None: any)."""
    return cp.fence_version if cp.fence_version is not None else cp.expected_version


def _fits(cp: Checkpoint, row: Any) -> bool:
    """Whether the checkpoint's fences match its locked row (saga_id, version, lease_owner)."""
    if cp.fence_version is not None and row[1] != cp.fence_version:
        return False
    if cp.expected_version is not None and row[1] != cp.expected_version:
        return False
    return cp.fence_owner is None or row[2] == cp.fence_owner


def _sid(saga_id: UUID) -> str:
    return f"'{saga_id.hex}'"  # hex digits only: nothing to escape


def _hex(value: Any) -> str:
    """A saga id read back, as 32 lowercase hex digits: MariaDB's UUID type gives it with
    dashes, CHAR(32) (MySQL) as it was written (``UUID.hex``)."""
    if isinstance(value, UUID):
        return value.hex
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text.replace("-", "").lower()


def _later(seconds: float) -> str:
    return f"TIMESTAMPADD(MICROSECOND, {int(seconds * 1_000_000)}, {_NOW})"


def _sets(cp: Checkpoint, text: str | None, lit: _Literal) -> str:
    sets = ""
    if text is not None:
        sets += ", context = " + lit(text)
    if cp.status is not None:
        sets += f", status = '{cp.status.value}'"
    if cp.reset_attempts:
        sets += ", recovery_attempts = 0"
    if cp.releases_lease:
        sets += ", lease_owner = NULL, lease_expires_at = NULL"
    elif cp.lease_seconds is not None:
        sets += ", lease_expires_at = " + _later(cp.lease_seconds)
    if cp.wait_seconds is not None:
        sets += ", next_attempt_at = " + _later(cp.wait_seconds)
    elif cp.clear_wait:
        sets += ", next_attempt_at = NULL"
    if cp.past_pivot:
        sets += ", past_pivot = TRUE"
    return sets


def _fence(cp: Checkpoint, lit: _Literal) -> str:
    """The checkpoint's fence as a condition on its saga's row (``TRUE`` when it has none)."""
    terms = []
    if cp.fence_version is not None:
        terms.append(f"version = {int(cp.fence_version)}")
    if cp.expected_version is not None:
        terms.append(f"version = {int(cp.expected_version)}")
    if cp.fence_owner is not None:
        terms.append("lease_owner = " + lit(cp.fence_owner))
    return " AND ".join(terms) or "TRUE"


def _entry(sid: str, e: PendingEntry, lit: _Literal) -> str:
    attempt = "NULL" if e.attempt is None else str(int(e.attempt))
    return (f"{sid}, {lit(e.step_name)}, '{e.action.value}', '{e.status.value}', "
            f"{lit(e.details)}, {lit(e.error_type)}, {attempt}")


def _start_row(s: LeasedStart, lit: _Literal) -> str:
    deadline = "NULL" if s.deadline_seconds is None else _later(s.deadline_seconds)
    return (f"({_sid(s.saga_id)}, {lit(s.name)}, 'RUNNING', {lit(s.text)}, 1, 0, "
            f"{lit(s.fingerprint)}, {lit(s.owner)}, {_later(s.lease_seconds)}, {_NOW}, {_NOW}, "
            f"{deadline})")


def _is_open(raw: Any) -> bool:
    """Whether the driver still has its connection (asyncmy: ``connected``; aiomysql:
    ``closed``)."""
    return not getattr(raw, "closed", False) and bool(getattr(raw, "connected", True))


def _error_code(error: BaseException) -> Any:
    args: Any = getattr(error, "args", ())
    return args[0] if args else None
