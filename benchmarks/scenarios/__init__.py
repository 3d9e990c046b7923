"""The benchmark's sections. Each module exposes ``TITLE``, ``NEEDS`` (the database backends it
uses, empty for none), optionally ``TIMEOUT_FACTOR`` (times the default section timeout) and ``async def run(session, section)`` filling the
``Section`` it is given; ``bench.py`` runs the ones asked
for, each under its own timeout, and writes one report.
"""

from __future__ import annotations

from scenarios import context, cpu, dispatch, failover, group, memory, recovery, scale, steps

SECTIONS = {
    "memory": memory,
    "cpu": cpu,
    "group": group,
    "scale": scale,
    "steps": steps,
    "context": context,
    "recovery": recovery,
    "dispatch": dispatch,
    "failover": failover,
}
"""Section name -> module, in report order."""
