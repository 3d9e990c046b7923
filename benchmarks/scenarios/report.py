"""The report: machine description, headline numbers, each section's tables, charts."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from scenarios.common import Section, Session

ROOT = Path(__file__).resolve().parents[2]

HOW_TO_READ = """\
- **Ratios, not absolutes.** Every database number is put next to a *floor* measured in the same
  run on the same server: the raw driver (asyncpg / asyncmy) doing the least a durable saga of N
  steps must write — N+2 single-statement autocommit writes (insert, one update per step, one to
  complete), with no step log, lease or fencing; sagakit also writes a log row per step and holds
  a lease. `x floor` > 1 is faster (throughput) or costlier (latency, CPU) than the floor.
  Absolute numbers move with the machine; ratios much less.
- **Client CPU** is this process's CPU time (user + system, so loopback TCP sends count) per saga;
  the database server's CPU is not included. **Latency** is one saga from start to end;
  **p99** over all sagas of a point. **Throughput** is a closed loop: c workers, each starting its
  next saga when the last ends.
- **commits/saga** counts server transactions (COMMITs, plus statements sent in autocommit mode);
  **statements/saga** every statement; both counted on a separate short run with hooks that would
  otherwise cost CPU. A PostgreSQL checkpoint is one statement (update and log insert in one CTE);
  a MariaDB checkpoint is three (update, log insert, COMMIT) sent as one query: one round trip.
- **Group commit** (`group_commit=True`) writes the starts and checkpoints of concurrently
  running sagas in one transaction; `writes/batch` says how many shared one (a saga writes 6
  times: its start and 5 checkpoints).
- This machine may be shared and busy: see the load average above. Numbers taken under load are
  noisy (the memory section reports the median of several rounds and their range); re-measure on a
  quiet machine before comparing with targets.
"""


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=ROOT,
                               capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = head.stdout.strip() or "unknown"
    return commit + (" (src/ has uncommitted changes)" if dirty.returncode == 1 else "")


def _meminfo() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sagakit() -> str:
    """sagakit's version and where it came from: this repository's src/ at its commit, or
    another copy (a snapshot of src/ on PYTHONPATH: its COMMIT file, if any, names the commit)."""
    import sagakit

    where = Path(sagakit.__file__).resolve().parents[1]
    if where == (ROOT / "src").resolve():
        return f"{_version('sagakit')} at commit {_git_commit()}"
    try:
        commit = f"a snapshot of commit {(where.parent / 'COMMIT').read_text().strip()}"
    except OSError:
        commit = "not this repository's src/"
    return f"imported from {where} ({commit})"


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine(session: Session, unreachable: dict[str, str], load_at_start: str) -> dict[str, str]:
    info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "CPU": _cpu_model(),
        "memory": _meminfo(),
        "load average (1/5/15 min) at start": load_at_start,
        "load average at end": _load(),
        "OS": platform.platform(),
        "Python": sys.version.split()[0],
        "sagakit": _sagakit(),
        "libraries": ", ".join(f"{p} {_version(p)}" for p in
                               ("SQLAlchemy", "asyncpg", "asyncmy", "orjson", "msgspec")),
    }
    for backend in session.backends.values():
        info[backend.label] = f"{backend.version} ({backend.settings})"
    for name, why in unreachable.items():
        info[name] = f"not measured: {why}"
    return info


# -- headline -------------------------------------------------------------------------------------


def _summary(sections: dict[str, Section]) -> list[str]:
    out: list[str] = []

    def get(section: str, *path: Any) -> Any:
        node: Any = sections.get(section)
        if node is None:
            return None
        node = node.data
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    us = get("memory", "us_per_step")
    if us is not None:
        low, high = get("memory", "us_per_step_min"), get("memory", "us_per_step_max")
        spread = f", {low:.1f}-{high:.1f} over rounds" if low is not None and high else ""
        out.append(f"Framework cost, 5-step no-op saga on the memory storage: **{us:.1f} µs per "
                   f"step** (median{spread}; target ≤ 15).")
    for name, label in (("postgres", "PostgreSQL"), ("mariadb", "MariaDB")):
        plain, floor = get("cpu", name, "plain"), get("cpu", name, "floor")
        if plain and floor:
            out.append(f"Client CPU per 5-step saga on {label}: **{plain['cpu_ms']:.2f} ms**, "
                       f"{plain['cpu_ms'] / floor['cpu_ms']:.2f}x the floor's "
                       f"{floor['cpu_ms']:.2f} ms" + (" (target ≤ 2 ms)." if name == "postgres"
                                                     else "."))
    for name, label in (("postgres", "PostgreSQL"), ("mariadb", "MariaDB")):
        group, floor = get("group", name, "group"), get("group", name, "floor")
        if group and floor and floor["throughput"]:
            out.append(f"Group commit at 32 concurrent sagas on {label}: **"
                       f"{group['throughput'] / floor['throughput']:.2f}x the floor's "
                       f"throughput** ({group['throughput']:.0f} vs {floor['throughput']:.0f} "
                       f"sagas/s; target ≥ 1.0x), p99 {group['p99_ms']:.1f} ms (floor "
                       f"{floor['p99_ms']:.1f} ms).")
    for name, label in (("postgres", "PostgreSQL"), ("mariadb", "MariaDB")):
        line = _recovery_line(get("recovery", name), label)
        if line:
            out.append(line)
    for name, label in (("postgres", "PostgreSQL"), ("mariadb", "MariaDB")):
        line = _dispatch_line(get("dispatch", name), label, name == "postgres")
        if line:
            out.append(line)
    line = _failover_line(get("failover"))
    if line:
        out.append(line)
    return [f"- {line}" for line in out]


def _recovery_line(data: Any, label: str) -> str | None:
    """Recovery on one backend: median sagas/s per worker process count, per variant."""
    if not data or "variants" not in data:
        return None
    parts = []
    for v in data["variants"].values():
        runs = [r for r in v["runs"] if r["per_s"]]
        if not runs:
            continue
        rates = ", ".join(f"{r['per_s']['median']:.0f}/s by {r['workers']}" for r in runs)
        ratio = runs[-1]["per_s"]["median"] / runs[0]["per_s"]["median"]
        parts.append(f"{v['what']} (backlog {v['backlog']}, concurrency {v['concurrency']}): "
                     f"{rates} worker processes, **{runs[-1]['workers']} vs 1: {ratio:.2f}x**")
    if not parts:
        return None
    index = (data.get("explain", {}).get("backlog") or {}).get("index", "?")
    return (f"Recovery on {label} (median of {data.get('rounds', 1)} round(s)): "
            + "; ".join(parts) + f" (target ≥ 2.5x). Listing index: {index}.")


def _failover_line(data: Any) -> str | None:
    """Failover: SIGKILL to the first step resumed elsewhere, per backend, with and without
    liveness."""
    if not data:
        return None
    labels = {"sqlite": "SQLite", "postgres": "PostgreSQL", "mariadb": "MariaDB"}
    parts = []
    for name, label in labels.items():
        d = data.get(name)
        if not d or "liveness" not in d:
            continue
        live, lease = d["liveness"], d["lease_bound"]
        parts.append(f"{label} p50 {live['p50_s']:.2f} s / p99 {live['p99_s']:.2f} s "
                     f"(lease-bound, 5 s lease: p50 {lease['p50_s']:.1f} s)")
    if not parts:
        return None
    return ("Failover, SIGKILL to the saga's first step resumed by another worker, liveness "
            "on: **" + "; ".join(parts) + "**; without liveness the default 30 s lease adds "
            "25 s to the lease-bound figures.")


def _dispatch_line(data: Any, label: str, target: bool) -> str | None:
    """Dispatch on one backend: latency with default workers, throughput per worker count,
    the idle worker's queries per second."""
    if not data or "idle" not in data:
        return None
    latency = data["latency"]["default"]
    runs = data["throughput"]["runs"]
    floor = data["floor"]["throughput"]
    parts = ", ".join(f"{r['per_s']['median']:.0f}/s by {r['workers']}" for r in runs)
    idle = data["idle"]
    queries = idle["client"].get("queries", float("nan"))
    wake = "LISTEN/NOTIFY wake-ups" if idle["wakeups"] else "polling, no wake-ups"
    text = (f"Dispatch on {label} ({wake}): submit-to-first-step **p50 "
            f"{latency['p50_ms']['median']:.0f} ms, p99 {latency['p99_ms']['median']:.0f} ms** "
            f"(default worker settings); throughput {parts} worker processes"
            + (f" ({runs[0]['per_s']['median'] / floor:.2f}x the floor with 1)" if runs and floor
               else "")
            + f"; an idle worker sends **{queries:.2f} queries/s**")
    if target:
        text += f" (target < 1: {'met' if queries < 1 else 'NOT met'})"
    return text + "."


# -- charts ---------------------------------------------------------------------------------------

_STYLE = {"floor": ("floor (raw driver)", ":"), "plain": ("sagakit", "-"),
          "group": ("sagakit group commit", "--")}
_COLOR = {"postgres": "tab:blue", "mariadb": "tab:orange"}


def charts(section: Section, out: Path) -> list[str]:
    """Draw throughput and p99 vs concurrency; return the file names written."""
    series = section.data.get("series") or {}
    if not any(points for modes in series.values() for points in modes.values()):
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        section.add("_(charts skipped: matplotlib is not installed — "
                    "`pip install 'sagakit[bench]'`)_")
        return []
    written = []
    for key, ylabel, name, log_y in (
        ("throughput", "sagas per second", "throughput.png", False),
        ("p99_ms", "p99 latency per saga (ms)", "p99.png", True),
    ):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for backend, modes in series.items():
            label = {"postgres": "PostgreSQL", "mariadb": "MariaDB"}.get(backend, backend)
            for mode, points in modes.items():
                if not points:
                    continue
                xs = [p["concurrency"] for p in points]
                ys = [p[key] for p in points]
                what, style = _STYLE[mode]
                ax.plot(xs, ys, style, marker="o", color=_COLOR.get(backend),
                        label=f"{label}: {what}")
        ax.set_xscale("log", base=2)
        ticks = sorted({p["concurrency"] for modes in series.values()
                        for points in modes.values() for p in points})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("concurrent sagas")
        ax.set_ylabel(ylabel)
        ax.set_title(f"5-step no-op saga: {ylabel} vs concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(name)
    return written


# -- writing --------------------------------------------------------------------------------------


def earlier(out: Path, ran: dict[str, Section]) -> tuple[dict[str, Section], dict[str, Any]]:
    """The sections of the report already in ``out`` (RESULTS.md and results.json) that this
    run did not run, in report order, each with its markdown as written then and its raw
    data; and that report's machine table, command and, per kept section, the date of the run
    that measured it. Nothing if either file is missing or unreadable."""
    from scenarios import SECTIONS

    try:
        old = json.loads((out / "results.json").read_text())
        markdown = (out / "RESULTS.md").read_text()
    except (OSError, ValueError):
        return {}, {}
    bodies: dict[str, str] = {}
    for chunk in markdown.split("\n## ")[1:]:
        lines = chunk.splitlines()
        status = next((i for i, line in enumerate(lines[:4])
                       if line.startswith("_Section `")), None)
        if status is not None:
            name = lines[status].split("`")[1]
            bodies[name] = "\n".join(lines[status + 1:]).strip()
    kept: dict[str, Section] = {}
    dates: dict[str, str] = {}
    for name in SECTIONS:
        stored = old.get("sections", {}).get(name)
        if name in ran or stored is None or name not in bodies:
            continue
        kept[name] = Section(SECTIONS[name].TITLE, [bodies[name]], stored.get("data", {}),
                             stored.get("elapsed_s", 0.0), stored.get("status", "ok"))
        dates[name] = stored.get("kept_from") or old.get("machine", {}).get("date", "?")
    return kept, {"machine": old.get("machine", {}), "argv": old.get("argv", []),
                  "dates": dates}


def write(session: Session, out: Path, argv: list[str], elapsed_s: float,
          unreachable: dict[str, str], load_at_start: str) -> Path:
    """Write RESULTS.md and results.json into ``out``. Sections of the report already there
    that this run did not run (``--only``) are kept as they were, marked as from the earlier
    run, so a partial run updates a full report instead of replacing it."""
    from scenarios import SECTIONS

    out.mkdir(parents=True, exist_ok=True)
    kept, before = earlier(out, session.sections)
    sections = {name: section for name in SECTIONS
                for section in [session.sections.get(name) or kept.get(name)] if section}
    images: list[str] = []
    if "scale" in session.sections:
        images = charts(sections["scale"], out)
    info = machine(session, unreachable, load_at_start)
    command = " ".join(["python benchmarks/bench.py", *argv])
    quick = " (**--quick**: small sizes, for development only)" if session.quick else ""
    written = f"Written by `{command}` in one run of {elapsed_s:.0f} s{quick}."
    if kept:
        then = before["machine"].get("date", "an earlier date")
        written = (f"Sections {', '.join(f'`{n}`' for n in session.sections)} written by "
                   f"`{command}` in one run of {elapsed_s:.0f} s{quick}, on {info['date']}; "
                   f"the others ({', '.join(f'`{n}`' for n in kept)}) kept from the report "
                   f"written on {then} by "
                   f"`{' '.join(['python benchmarks/bench.py', *before['argv']])}` (at "
                   f"{before['machine'].get('sagakit', '?')}).")
        info["sections kept from the earlier report"] = (
            f"{', '.join(kept)}: machine then {before['machine'].get('CPU', '?')}, load "
            f"{before['machine'].get('load average (1/5/15 min) at start', '?')}")
    lines = [
        "# sagakit benchmark results",
        "",
        written,
        "",
        "## Headline numbers",
        "",
        *(_summary(sections) or ["- (no headline section was run)"]),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "## How to read",
        "",
        HOW_TO_READ,
    ]
    for name, section in sections.items():
        status = section.status
        if name in kept:
            status += f" (kept from an earlier run, {before['dates'][name]})"
        lines += [f"## {section.title}", "",
                  f"_Section `{name}`: {status}, {section.elapsed_s:.0f} s._", ""]
        for block in section.blocks:
            lines += [block, ""]
        if name == "scale" and name not in kept:
            lines += [f"![{img.removesuffix('.png')}]({img})" for img in images]
            lines.append("")
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    raw = {"argv": argv, "elapsed_s": elapsed_s, "machine": info,
           "sections": {k: {"status": s.status, "elapsed_s": s.elapsed_s, "data": s.data,
                            **({"kept_from": before["dates"][k]} if k in kept else {})}
                        for k, s in sections.items()}}
    (out / "results.json").write_text(json.dumps(raw, indent=1, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
