"""The recovery section's report (scenarios/recovery.py measures): throughput per worker count
and variant, where the time goes, the claims and waits, and the EXPLAIN plans."""

from __future__ import annotations

from typing import Any

from scenarios.common import Backend, Section, fmt, show, table, verdict
from scenarios.explain import LISTING_LIMIT, LIVE_LEASED

TARGET = 2.5
"""4 worker processes should recover at least this many times as fast as 1 (issue 14)."""


def intro(sizes: Any, kinds: dict[str, dict[str, Any]], where: str) -> str:
    parts = "; ".join(f"**{name}**: {k['what']}, a backlog of {k['backlog']}, concurrency "
                      f"{k['concurrency']} per worker" for name, k in kinds.items())
    return (
        f"Interrupted 5-step sagas (RUNNING, no lease, no step log) recovered by "
        f"{', '.join(map(str, sizes.recovery_workers))} RecoveryWorker instances, {where}. "
        f"Variants — {parts}. Each worker has its own engine (pool = concurrency + 2) and "
        "poll_interval=0.05 s, liveness on (the default). Each worker claims up to its free "
        "slots of due sagas in one atomic step (claim_due: FOR UPDATE SKIP LOCKED on "
        "PostgreSQL; on MariaDB an unlocked read of the due sagas, in index order, and a "
        "primary-key UPDATE that re-checks each lease), so workers take disjoint sagas: busy = "
        "claims lost to another worker (0 expected); attempts = recoveries tried. Median over "
        f"{sizes.recovery_rounds} round(s), range in brackets (rounds are the outer loop). "
        "CPU per recovered saga: client = the workers' own; server = the database server's "
        "processes (/proc); machine = every core's busy time (workers, server, this "
        "benchmark process and anything else running), also shown as cores busy of the 2. "
        "The machine has 2 cores shared by the workers and the database server.")


def _claims_row(run: dict[str, Any]) -> list[str]:
    claims = run["claims"] or {}
    c, q = claims.get("claim_due"), claims.get("claim_queued")
    if not c or not c["calls"]:
        return [str(run["workers"]), "-", "-", "-", "-", "-", "-", "-"]
    recovered = sum(r["recovered"] for r in run["rounds"]) or 1
    return [str(run["workers"]), fmt(c["calls"] / recovered, 2), fmt(c["got"] / c["calls"], 2),
            f"{100 * c['empty'] / c['calls']:.0f}%", fmt(1000 * c["seconds"] / c["calls"], 2),
            str(c["conflicts"]),
            fmt(q["calls"] / recovered, 2) if q else "-", _row_locks(run)]


def _row_locks(run: dict[str, Any]) -> str:
    """InnoDB row-lock waits (count, ms) over the rounds (MariaDB; global counters)."""
    w = run.get("waits") or {}
    i = w.get("innodb") or {}
    if "Innodb_row_lock_waits" not in i:
        return "-"
    return f"{i['Innodb_row_lock_waits']:.0f} ({i.get('Innodb_row_lock_time', 0):.0f} ms)"


def _cpu(run: dict[str, Any], key: str, digits: int = 2) -> str:
    value = run.get(key)
    return show(value, digits) if value else "-"


def _waits(label: str, run: dict[str, Any]) -> str | None:
    w = run["waits"]
    if not w or not w["samples"]:
        return None
    active = w["active"] or 1
    top = ", ".join(f"{name} {100 * n / active:.0f}%" for name, n in w["waits"])
    text = (f"{label}, {run['workers']} workers: {w['samples']} samples (every 0.1 s) of the "
            f"workers' server sessions saw {w['session_samples']} sessions, {w['active']} of "
            f"them running a statement; of those: {top or '-'}; waiting for a lock: "
            f"{w['lock_waits']}")
    if w["innodb"]:
        i = w["innodb"]
        text += (f". InnoDB over the runs (global counters): "
                 f"{i.get('Innodb_row_lock_waits', 0):.0f} row-lock waits, "
                 f"{i.get('Innodb_row_lock_time', 0):.0f} ms waited, "
                 f"{i.get('Innodb_deadlocks', 0):.0f} deadlocks")
    return text + "."


def report(section: Section, backend: Backend, data: dict[str, Any], backlog: int) -> None:
    label = backend.label
    section.add(f"**{label}**")
    ratios: dict[str, float] = {}
    for name, v in data["variants"].items():
        runs = v["runs"]
        if not runs:
            continue
        base = runs[0]["per_s"]["median"] if runs[0]["per_s"] else None
        section.add(f"{label}, **{name}** ({v['what']}; backlog {v['backlog']}, concurrency "
                    f"{v['concurrency']} per worker):")
        rows, cpu_rows = [], []
        for run in runs:
            rs = run["rounds"]
            per = run["per_s"]
            x1 = f"{per['median'] / base:.2f}x" if per and base else "-"
            rows.append([
                str(run["workers"]), str(min(r["recovered"] for r in rs)),
                show(run["elapsed_s"], 1), show(per, 0, True) if per else "-", x1,
                str(max(r["attempts"] for r in rs)), str(sum(r["busy"] for r in rs)),
                str(sum(r["errors"] for r in rs)),
                fmt(max(r["backlog_insert_s"] for r in rs), 1),
                str(min(r["completed_rows"] for r in rs))])
            cpu_rows.append([str(run["workers"]), _cpu(run, "client_cpu_ms_per_saga"),
                             _cpu(run, "server_cpu_ms_per_saga"),
                             _cpu(run, "bench_cpu_ms_per_saga"),
                             _cpu(run, "other_cpu_ms_per_saga"),
                             _cpu(run, "machine_cpu_ms_per_saga"),
                             _cpu(run, "machine_cores_busy"), _cpu(run, "steal_cores")])
            if base and per and run is runs[-1] and len(runs) > 1:
                ratios[name] = per["median"] / base
        section.add(table(["workers", "recovered", "seconds", "sagas/s", "x 1 worker",
                           "attempts", "busy", "errors", "backlog insert s", "COMPLETED rows"],
                          rows))
        section.add("recovered, attempts, COMPLETED rows: the worst round (fewest recovered "
                    "and rows, most attempts); busy, errors: all rounds together.")
        section.add("Where the CPU goes, ms per recovered saga — client: the workers; server: "
                    "the database server; bench: this process (watching, sampling); other: "
                    "the rest of the machine's busy time (other processes); cores busy of the "
                    "2, and cores stolen by the hypervisor:")
        section.add(table(["workers", "client", "server", "bench", "other", "machine",
                           "cores busy", "cores stolen"], cpu_rows))
        section.add("The workers' claims (claim_due, counted in the workers; ms = from the call "
                    "to its answer, waits for a connection and for the event loop included); "
                    "each worker also serves the default queue (empty here): its claim_queued "
                    "calls per saga; counted until the backlog was drained. InnoDB row-lock "
                    "waits: the server's global counters over the rounds (MariaDB).")
        section.add(table(["workers", "claims/saga", "sagas/claim", "empty claims",
                           "ms/claim", "lock conflicts", "claim_queued/saga",
                           "InnoDB row-lock waits (ms)"],
                          [_claims_row(r) for r in runs]))
        for run in runs:
            if run["workers"] == max(r["workers"] for r in runs):
                line = _waits(f"{label}, {name}", run)
                if line:
                    section.add(line)
            for r in run["rounds"]:
                if r["first_error"]:
                    section.add(f"First error ({run['workers']} workers, {name}): "
                                f"`{r['first_error']}`")
                    break
    if ratios:
        last = max(r["workers"] for v in data["variants"].values() for r in v["runs"])
        section.add(f"{label}: {last} workers recover "
                    + ", ".join(f"**{x:.2f}x** as fast as 1 ({n})" for n, x in ratios.items())
                    + f"; target ≥ {TARGET}x: "
                    + ", ".join(f"{n} {verdict(x >= TARGET)}" for n, x in ratios.items())
                    + ".")
    data["ratios"] = ratios
    costs = data["costs"]
    if costs:
        section.add(
            f"{label}: one recovery costs {costs['statements']:.2f} statements, of them "
            f"{costs['reads']:.2f} reads, in {costs['commits']:.2f} server transactions "
            "(counted with one worker, concurrency 1, on a separate backlog of "
            f"{min(50, backlog)}; the listing query is shared by the batch).")
    explains = data["explain"]
    for key, title in (("backlog", f"with the backlog of {backlog} due"),
                       ("steady", "afterwards: every saga COMPLETED, none due")):
        if key in explains:
            section.add(f"EXPLAIN of get_sagas_for_recovery({LISTING_LIMIT})'s query on "
                        f"{label}, {title} — index used: **{explains[key]['index']}**")
            section.add(f"```\n{explains[key]['plan']}\n```")
    claim = explains.get("claim")
    if claim:
        for key, title in (("due", f"with a backlog of {backlog} due, none leased"),
                           ("live_leased", f"the same backlog with its {claim.get('leased')} "
                                           "oldest sagas (first in the claim's order) leased "
                                           "for an hour by a live owner (a liveness session "
                                           "this process holds)")):
            for plan, index in claim.get(key, []):
                section.add(f"EXPLAIN of claim_due's statement on {label}, {title} — index "
                            f"used: **{index}**")
                section.add(f"```\n{plan}\n```")
        if claim.get("note"):
            section.add(f"{label}: claim EXPLAIN with live leases: {claim['note']}")


__all__ = ["LIVE_LEASED", "TARGET", "intro", "report"]
