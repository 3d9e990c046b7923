"""EXPLAIN of the statements a storage call sends, captured as sent and explained with the same
parameters: PostgreSQL ``EXPLAIN (ANALYZE, BUFFERS)`` in a transaction rolled back; MariaDB
``ANALYZE`` for a SELECT (it runs the query: actual rows, ``r_rows``, beside the estimates) and
``EXPLAIN`` for an UPDATE. Used for the recovery listing, the recovery claim (``claim_due``,
with its liveness predicate) and the dispatch claim.
"""

from __future__ import annotations

from typing import Any

LISTING_LIMIT = 32
LIVE_LEASED = 1000
"""Backlog rows (the oldest, first in the claim's index order) leased by a live owner in the
claim's second EXPLAIN."""


async def captured(storage: Any, call: Any, wanted: Any) -> list[tuple[str, Any]]:
    """The statements on the executions table that ``await call()`` sends and
    ``wanted(statement)`` accepts, with their parameters, in order."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []
    name = storage.tables.executions.name

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if name in statement and wanted(statement):
            seen.append((statement, parameters))

    engine = storage.engine.sync_engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        await call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return seen


async def explain_statement(storage: Any, statement: str, parameters: Any) -> tuple[str, str]:
    """(statement, parameters and plan; the sagakit indexes the plan uses)."""
    pg = storage.dialect.is_postgres
    if pg:
        prefix = "EXPLAIN (ANALYZE, BUFFERS) "
    else:
        prefix = "ANALYZE " if statement.lstrip().upper().startswith("SELECT") else "EXPLAIN "
    async with storage.engine.connect() as conn:
        result = await conn.exec_driver_sql(prefix + statement, parameters)
        keys = list(result.keys())
        rows = result.all()
        await conn.rollback()
    indexes = [str(ix.name) for ix in storage.tables.executions.indexes]
    if pg:
        plan = "\n".join(str(r[0]) for r in rows)
        used = [ix for ix in indexes if ix in plan]
    else:
        plan = "\n".join(
            "  ".join(f"{k}={v}" for k, v in zip(keys, r, strict=True) if v is not None)
            for r in rows)
        chosen = {str(r._mapping["key"]) for r in rows if r._mapping.get("key")}
        used = [ix for ix in indexes if ix in chosen]
    text = f"{statement.strip()}\n-- parameters: {parameters!r}\n\n{prefix.strip()}:\n{plan}"
    return text, ", ".join(used) if used else "none (no sagakit index in the plan)"


async def explain_call(storage: Any, call: Any, wanted: Any) -> tuple[str, str]:
    """(EXPLAIN output, index used) of the last statement ``await call()`` sends that
    ``wanted`` accepts."""
    seen = await captured(storage, call, wanted)
    if not seen:
        return "(the query was not seen)", "unknown"
    return await explain_statement(storage, *seen[-1])


async def explain_listing(storage: Any) -> tuple[str, str]:
    """(EXPLAIN output, index used) of the query get_sagas_for_recovery sends."""
    return await explain_call(storage, lambda: storage.get_sagas_for_recovery(LISTING_LIMIT),
                              lambda statement: statement.lstrip().upper().startswith("SELECT"))


async def explain_claim(storage: Any, saga: Any, limit: int) -> list[tuple[str, str]]:
    """EXPLAIN of what ``claim_due`` sends (PostgreSQL: its one UPDATE ... RETURNING;
    MariaDB: the candidate SELECT, the locking SELECT ... FOR UPDATE SKIP LOCKED where the
    storage sends one, and the primary-key UPDATE). The call itself claims up to
    ``limit`` sagas (for 60 s, under an owner no worker has); the explained statements run
    again, rolled back."""
    owner = f"bench-explain-{id(storage) % 1000}-{limit}"

    def wanted(statement: str) -> bool:  # not the read-back of the rows leased
        head = statement.lstrip().upper()
        return head.startswith("UPDATE") or (head.startswith("SELECT") and (
            "UNION" in head or "FOR UPDATE" in head))

    seen = await captured(storage, lambda: storage.claim_due(
        owner, limit=limit, lease_seconds=60, saga_names=frozenset({saga.name})), wanted)
    if not seen:
        return [("(the claim was not seen)", "unknown")]
    return [await explain_statement(storage, s, p) for s, p in seen]


async def lease_oldest(storage: Any, owner: str, count: int) -> int:
    """Lease the ``count`` oldest due sagas (first in the claim's order) to ``owner`` for an
    hour; how many were leased."""
    import sqlalchemy as sa

    t = storage.tables.executions
    until: Any = sa.literal_column("now() + interval '1 hour'" if storage.dialect.is_postgres
                              else "UTC_TIMESTAMP(6) + INTERVAL 1 HOUR")
    async with storage.engine.begin() as conn:
        ids = [r[0] for r in (await conn.execute(
            sa.select(t.c.saga_id).where(t.c.status == "RUNNING", t.c.lease_owner.is_(None))
            .order_by(t.c.updated_at, t.c.saga_id).limit(count))).all()]
        if ids:
            await conn.execute(t.update().where(t.c.saga_id.in_(ids))
                               .values(lease_owner=owner, lease_expires_at=until))
    return len(ids)


async def explain_claims(storage: Any, saga: Any, limit: int) -> dict[str, Any]:
    """The claim's EXPLAIN with the backlog due, then with the LIVE_LEASED oldest sagas leased
    by a live owner (a liveness session this process holds while the claim runs): the claim
    has to pass over them, judging each owner alive."""
    out: dict[str, Any] = {"due": await explain_claim(storage, saga, limit)}
    async with storage.liveness() as live:
        if not live.live:
            out["note"] = "no liveness session could be opened"
            return out
        out["leased"] = await lease_oldest(storage, live.owner, LIVE_LEASED)
        out["owner"] = live.owner
        out["live_leased"] = await explain_claim(storage, saga, limit)
    return out
