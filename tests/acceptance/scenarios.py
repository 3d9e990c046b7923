"""The sagas a harness run plans: which definition, what fails, where the processes crash.

:func:`make_plan` draws them from the run's seeded random generator (see
:mod:`tests.acceptance.harness`); each plan entry is the saga's initial context
(:class:`~tests.acceptance.crashsaga.CrashContext` as a dict), and the checker reads its
expectations from it.
"""

from __future__ import annotations

import random
import uuid
from typing import TYPE_CHECKING, Any

from tests.acceptance.crashsaga import (
    CRASH_POINTS,
    DURABLE_WAIT,
    FORWARD_RETRY,
    PIVOT,
    STEP_NAMES,
    wait_before,
)

if TYPE_CHECKING:
    from tests.acceptance.harness import HarnessConfig

__all__ = ["make_plan", "reachable"]


def _retried(config: dict[str, Any], k: int) -> int:
    """The failed attempts of ForwardSaga's step k that another attempt follows (crashes
    aside)."""
    attempts = FORWARD_RETRY[STEP_NAMES[k]].attempts
    if config["fail_step"] == k:
        return attempts - 1 if config["fail_mode"] == "exhaust" else 0
    return min(int(config["act_transient"].get(str(k), 0)), attempts - 1)


def reachable(config: dict[str, Any]) -> list[str]:
    """The crash points a saga of this configuration goes through."""
    fail, permanent = config["fail_step"], config["comp_permanent"]
    forward = config["definition"] == "ForwardSaga"
    points: list[str] = []
    for k in range(len(STEP_NAMES) if fail is None else fail + 1):
        points += [f"act:{k}:{p}" for p in CRASH_POINTS if not (p == "end" and k == fail)]
        if not forward:
            continue
        name = STEP_NAMES[k]
        retried = _retried(config, k)
        if retried:
            points += [f"retry:{k}:{p}" for p in CRASH_POINTS]
        waits = [wait_before(name, n + 1) for n in range(1, retried + 1)]
        points += [f"wait:{k}"] if any(w <= DURABLE_WAIT for w in waits) else []
        points += [f"waiting:{k}"] if any(w > DURABLE_WAIT for w in waits) else []
    if forward and (fail is None or fail > PIVOT):
        points += ["pivot:before", "pivot:after"]
        return points  # past the pivot nothing is compensated
    for k in range(fail or 0):
        points += [f"comp:{k}:{p}" for p in CRASH_POINTS if not (p == "end" and k == permanent)]
    return points


# The first sagas of every run: one of each kind of crash point, so a tiny run covers them all.
# CrashSaga: (fail_step, comp_permanent, crashes).
_COVERAGE: list[tuple[int | None, int | None, list[str]]] = [
    (None, None, ["act:2:start", "act:3:end"]),
    (None, None, ["act:1:mid"]),
    (3, None, ["comp:1:mid", "comp:2:end"]),
    (3, 1, ["comp:0:start"]),
    (2, None, ["act:2:mid", "comp:0:mid"]),
]
# ForwardSaga, interleaved with those (the first six sagas include a saga parked past its pivot
# and waits of both kinds, for the sabotage tests).
_FORWARD_COVERAGE: list[dict[str, Any]] = [
    {"act_transient": {"2": 3}, "crashes": ["wait:2", "retry:2:mid"]},
    {"act_transient": {"4": 2}, "crashes": ["waiting:4", "pivot:before"]},
    {"fail_step": 3, "fail_mode": "exhaust", "crashes": ["retry:3:end", "wait:3"]},  # PARKED
    {"act_transient": {"0": 1, "3": 1}, "crashes": ["pivot:after", "retry:0:start"]},
    {"fail_step": 1, "fail_mode": "permanent", "act_transient": {"0": 2},
     "crashes": ["retry:0:end", "comp:0:mid"]},
    {"fail_step": 0, "fail_mode": "exhaust", "crashes": ["waiting:0"]},
]


def _coverage() -> list[dict[str, Any]]:
    crash = [{"fail_step": f, "comp_permanent": p, "crashes": c} for f, p, c in _COVERAGE]
    forward = [{"definition": "ForwardSaga", **c} for c in _FORWARD_COVERAGE]
    mixed: list[dict[str, Any]] = []
    for i in range(max(len(crash), len(forward))):
        mixed += crash[i:i + 1] + forward[i:i + 1]
    return mixed


def _plan_crash(ctx: dict[str, Any], config: HarnessConfig, rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.45:
        pass
    elif roll < 0.75:
        ctx["fail_step"] = rng.randint(1, 4)
    elif roll < 0.9:
        ctx["fail_step"] = rng.randint(2, 4)
        for k in rng.sample(range(ctx["fail_step"]), rng.randint(1, 2)):
            n = rng.randint(1, max(config.retry - 1, 1))
            ctx["comp_transient"][str(k)] = config.retry if config.exhaust_retries else n
    else:
        ctx["fail_step"] = rng.randint(2, 4)
        ctx["comp_permanent"] = rng.randrange(ctx["fail_step"])


def _plan_forward(ctx: dict[str, Any], config: HarnessConfig, rng: random.Random) -> None:
    ctx["definition"] = "ForwardSaga"
    roll = rng.random()
    if roll < 0.45:
        pass
    elif roll < 0.7:  # fails for good before the pivot: compensates
        ctx["fail_step"] = rng.randint(0, PIVOT)
        ctx["fail_mode"] = rng.choice(("permanent", "exhaust"))
        if ctx["fail_step"] > 0 and rng.random() < 0.3:
            ctx["comp_transient"]["0"] = rng.randint(1, max(config.retry - 1, 1))
    else:  # fails at every attempt after the pivot: PARKED
        ctx["fail_step"] = rng.randint(PIVOT + 1, len(STEP_NAMES) - 1)
        ctx["fail_mode"] = "exhaust"
    before = range(len(STEP_NAMES) if ctx["fail_step"] is None else ctx["fail_step"])
    for k in rng.sample(before, min(len(before), rng.randint(0, 2))):
        ctx["act_transient"][str(k)] = rng.randint(1, FORWARD_RETRY[STEP_NAMES[k]].attempts - 1)


def make_plan(config: HarnessConfig, rng: random.Random) -> dict[str, dict[str, Any]]:
    plan: dict[str, dict[str, Any]] = {}
    coverage = _coverage()
    for i in range(config.sagas):
        saga_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        ctx: dict[str, Any] = {"key": f"s{i:03d}", "definition": "CrashSaga", "fail_step": None,
                               "fail_mode": "error", "act_transient": {}, "comp_transient": {},
                               "comp_permanent": None, "crashes": [],
                               "step_ms": config.step_ms, "done": []}
        if i < len(coverage):
            ctx.update(coverage[i])
            assert set(ctx["crashes"]) <= set(reachable(ctx)), ctx
            plan[saga_id] = ctx
            continue
        if rng.random() < config.forward_share:
            _plan_forward(ctx, config, rng)
        else:
            _plan_crash(ctx, config, rng)
        if rng.random() < config.crash_rate:
            points = reachable(ctx)
            ctx["crashes"] = rng.sample(points, min(len(points), rng.choice((1, 1, 2))))
            forward = [p for p in points if not p.startswith(("act:", "comp:"))]
            if forward and rng.random() < 0.5:  # forward recovery's points are fewer: favour them
                ctx["crashes"][0] = rng.choice(forward)
                ctx["crashes"] = list(dict.fromkeys(ctx["crashes"]))
        plan[saga_id] = ctx
    return plan
