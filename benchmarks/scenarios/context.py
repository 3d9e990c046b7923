"""Cost as the context grows (about 100 B, 10 KB, 1 MB of JSON), 5-step sagas one at a time, in
two variants: ``keep`` — no step touches the context, so no checkpoint may carry it (it is sent
once, when the saga row is inserted); ``touch`` — every step changes one counter in it, so every
checkpoint rewrites it whole. Bytes = the text carried by the statements' parameters, counted on
the client on a separate short run."""

from __future__ import annotations

from typing import Any

import orjson

from scenarios.common import (
    Section,
    Session,
    count_costs,
    drive,
    fmt,
    measure_sagakit,
    new_context,
    run_saga,
    saga_class,
    table,
    verdict,
)

TITLE = "Cost as the context grows"
NEEDS = ("postgres", "mariadb")
STEPS = 5


def payload_for(size: int) -> str:
    """A payload making the context's JSON about ``size`` bytes."""
    overhead = len(orjson.dumps(new_context("").to_dict()))
    return "x" * max(0, size - overhead)


def _size_label(size: int) -> str:
    if size >= 1_000_000:
        return f"{size / 1_000_000:g} MB"
    if size >= 1000:
        return f"{size / 1000:g} KB"
    return f"{size} B"


async def _memory(payload: str, touch: bool, sagas: int) -> Any:
    from sagakit import MemorySagaStorage

    storage = MemorySagaStorage()
    saga = saga_class(STEPS, touch)()

    async def one() -> None:
        await run_saga(saga, storage, payload)

    return await drive("memory", one, 1, sagas, warmup=min(sagas, 3))


async def run(session: Session, section: Section) -> None:
    sizes = session.sizes
    section.add(
        f"{sizes.context_sagas} sagas of {STEPS} steps per point, one at a time. "
        "sent/context = parameter bytes per saga / the context's JSON size: about 1 means the "
        "context went over the wire once (the insert), about 6 means every checkpoint rewrote it."
    )
    data: dict[str, Any] = section.data
    targets: list[Any] = [None, *session.backends.values()]
    for backend in targets:
        name = "memory" if backend is None else backend.name
        rows = []
        data[name] = []
        verdicts = []
        for size in sizes.context_sizes:
            payload = payload_for(size)
            actual = len(orjson.dumps(new_context(payload).to_dict()))
            for touch in (False, True):
                variant = "touch" if touch else "keep"
                session.log(f"{name}: context {_size_label(size)} {variant}")
                if backend is None:
                    m = await _memory(payload, touch, max(sizes.context_sagas, 10))
                    sent = None
                else:
                    m = await measure_sagakit(session, backend, False, 1, sizes.context_sagas,
                                              payload=payload, touch=touch)
                    _, _, sent = await count_costs(session, backend, False, 1,
                                                   max(2, sizes.count_sagas // 4),
                                                   payload=payload, touch=touch)
                copies = None if sent is None else sent / actual
                if copies is not None and not touch and size >= 10_000:
                    verdicts.append(copies < 1.5)
                data[name].append({"size": actual, "variant": variant, "mean_ms": m.mean_ms,
                                   "cpu_ms": m.cpu_ms, "param_bytes": sent, "copies": copies})
                rows.append([_size_label(size), variant, fmt(m.mean_ms, 2), fmt(m.cpu_ms, 3),
                             fmt(m.mean_ms / STEPS, 3), fmt(sent, 0), fmt(copies, 2)])
        label = "memory storage" if backend is None else backend.label
        section.add(f"**{label}**")
        section.add(table(["context", "steps", "wall ms/saga", "client CPU ms/saga",
                           "wall ms/step", "param bytes/saga", "sent/context"], rows))
        if verdicts:
            section.add(
                f"{label}: an unchanged context of 10 KB or more is sent once per saga, never by a "
                f"step's checkpoint: {verdict(all(verdicts))}."
            )
