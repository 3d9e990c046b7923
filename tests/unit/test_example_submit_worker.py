"""examples/saga_submit_worker.py runs as a script: every submitted order completes, run by the
workers, never past the queue's limits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "saga_submit_worker.py"


def test_the_workers_run_every_order_within_the_queue_limits() -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "submitted 6 orders; nothing ran yet in this process"
    assert lines[1:3] == ["o-0: Reserve act COMPLETED", "o-0: Ship act COMPLETED"]
    assert [line for line in lines if line.endswith("shipped=True")] == [
        f"o-{i}: COMPLETED, shipped=True" for i in range(6)]
    assert lines[-1] == "most orders running at once: 2 (limit 2); per customer: 1 (limit 1)"
