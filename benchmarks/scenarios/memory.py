"""Framework cost: no-op sagas on the memory storage, one at a time (no database at all).

Per step = client CPU per saga / steps (saga start and finish included, so this is the cost a
user sees per step of a 5-step saga). The marginal cost per step (the slope between the 5- and
20-step sagas) leaves the per-saga part out.
"""

from __future__ import annotations

import time

from scenarios.common import Section, Session, fmt, run_saga, saga_class, table, verdict

TITLE = "Framework cost (memory storage)"
NEEDS: tuple[str, ...] = ()
TARGET_US_PER_STEP = 15.0


async def _cpu_per_saga(steps: int, sagas: int, repeats: int) -> tuple[float, float]:
    """(best, median) CPU seconds per saga over ``repeats`` runs of ``sagas`` sagas, and the
    wall time alike is close: nothing waits."""
    from sagakit import MemorySagaStorage

    saga = saga_class(steps)()
    samples = []
    for _ in range(repeats):
        storage = MemorySagaStorage()  # fresh: the dicts of earlier repeats do not grow
        for _ in range(min(100, sagas)):
            await run_saga(saga, storage)
        cpu0 = time.process_time()
        for _ in range(sagas):
            await run_saga(saga, storage)
        samples.append((time.process_time() - cpu0) / sagas)
    samples.sort()
    return samples[0], samples[len(samples) // 2]


async def run(session: Session, section: Section) -> None:
    sizes = session.sizes
    rows, data = [], {}
    for steps in (5, 20):
        session.log(f"memory: {steps}-step saga x {sizes.memory_sagas} x {sizes.memory_repeats}")
        best, median = await _cpu_per_saga(steps, sizes.memory_sagas, sizes.memory_repeats)
        data[steps] = {"best_us_per_saga": best * 1e6, "median_us_per_saga": median * 1e6}
        rows.append([f"{steps}", fmt(best * 1e6, 1), fmt(median * 1e6, 1),
                     fmt(best * 1e6 / steps, 2), fmt(median * 1e6 / steps, 2)])
    per_step = data[5]["best_us_per_saga"] / 5
    marginal = (data[20]["best_us_per_saga"] - data[5]["best_us_per_saga"]) / 15
    data["us_per_step"] = per_step
    data["marginal_us_per_step"] = marginal
    section.data = {"by_steps": {str(k): v for k, v in data.items() if isinstance(k, int)},
                    "us_per_step": per_step, "marginal_us_per_step": marginal,
                    "target_us_per_step": TARGET_US_PER_STEP}
    section.add(
        f"{sizes.memory_sagas} sagas one after another, {sizes.memory_repeats} repeats on a fresh "
        "MemorySagaStorage each; client CPU time (user + system). Best = the fastest repeat, "
        "the least disturbed by other load on the machine."
    )
    section.add(table(["steps", "µs/saga best", "µs/saga median", "µs/step best",
                       "µs/step median"], rows))
    section.add(
        f"**5-step no-op saga: {per_step:.1f} µs per step** (target ≤ {TARGET_US_PER_STEP:.0f}: "
        f"{verdict(per_step <= TARGET_US_PER_STEP)}); marginal cost of one more step "
        f"{marginal:.1f} µs (slope between 5 and 20 steps, the per-saga start/finish left out)."
    )
