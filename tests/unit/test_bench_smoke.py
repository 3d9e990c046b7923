"""benchmarks/bench.py runs (quick, memory section only: no database server) and writes its
report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


def test_quick_memory_run_writes_the_report(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "memory", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr

    report = (tmp_path / "RESULTS.md").read_text()
    assert report.startswith("# sagakit benchmark results")
    assert "## Framework cost (memory storage)" in report
    assert "_Section `memory`: ok" in report
    assert "µs per step" in report
    assert "## Machine" in report
    assert "## How to read" in report
    for absent in ("## Client CPU", "## Recovery throughput",
                   "## Dispatch"):  # --only memory
        assert absent not in report

    raw = json.loads((tmp_path / "results.json").read_text())
    memory = raw["sections"]["memory"]
    assert memory["status"] == "ok"
    assert memory["data"]["us_per_step"] > 0
