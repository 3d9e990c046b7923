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


async def _cpu_per_saga(steps: int, sagas: int, repeats: int) -> list[float]:
    """CPU seconds per saga in each of ``repeats`` rounds of ``sagas`` sagas, sorted (nothing
    waits, so the wall time is close)."""
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
    return samples


async def run(session: Session, section: Section) -> None:
    sizes = session.sizes
    rows, data = [], {}
    for steps in (5, 20):
        session.log(f"memory: {steps}-step saga x {sizes.memory_sagas} x {sizes.memory_repeats}")
        samples = await _cpu_per_saga(steps, sizes.memory_sagas, sizes.memory_repeats)
        median = samples[len(samples) // 2]
        data[steps] = {"median_us_per_saga": median * 1e6, "min_us_per_saga": samples[0] * 1e6,
                       "max_us_per_saga": samples[-1] * 1e6}
        rows.append([f"{steps}", fmt(median * 1e6, 1),
                     f"{fmt(samples[0] * 1e6, 1)}-{fmt(samples[-1] * 1e6, 1)}",
                     fmt(median * 1e6 / steps, 2),
                     f"{fmt(samples[0] * 1e6 / steps, 2)}-{fmt(samples[-1] * 1e6 / steps, 2)}"])
    per_step = data[5]["median_us_per_saga"] / 5
    low, high = data[5]["min_us_per_saga"] / 5, data[5]["max_us_per_saga"] / 5
    marginal = (data[20]["median_us_per_saga"] - data[5]["median_us_per_saga"]) / 15
    data["us_per_step"] = per_step
    data["marginal_us_per_step"] = marginal
    section.data = {"by_steps": {str(k): v for k, v in data.items() if isinstance(k, int)},
                    "us_per_step": per_step, "us_per_step_min": low, "us_per_step_max": high,
                    "marginal_us_per_step": marginal, "target_us_per_step": TARGET_US_PER_STEP}
    section.add(
        f"{sizes.memory_sagas} sagas one after another, {sizes.memory_repeats} rounds on a fresh "
        "MemorySagaStorage each; client CPU time (user + system). The median round, with the "
        "range over rounds."
    )
    section.add(table(["steps", "µs/saga median", "µs/saga min-max", "µs/step median",
                       "µs/step min-max"], rows))
    section.add(
        f"**5-step no-op saga: {per_step:.1f} µs per step** (median; {low:.1f}-{high:.1f} over "
        f"rounds; target ≤ {TARGET_US_PER_STEP:.0f}: {verdict(per_step <= TARGET_US_PER_STEP)}); "
        f"marginal cost of one more step {marginal:.1f} µs (slope between 5 and 20 steps, the "
        "per-saga start/finish left out)."
    )
