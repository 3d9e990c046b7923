"""examples/saga.py runs as a script and tells the success and the rollback story."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "saga.py"


@pytest.fixture(scope="module")
def output() -> list[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


def section(lines: list[str], title: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if title in line)
    rest = lines[start + 1 :]
    end = next((i for i, line in enumerate(rest) if line.startswith("== ")), len(rest))
    return rest[:end]


def test_success_scenario_runs_every_step_in_order(output):
    lines = section(output, "Scenario 1")
    completed = [line.split()[2] for line in lines if line.startswith("Step completed:")]
    assert completed == ["ReserveInventoryStep", "ProcessPaymentStep", "ShipOrderStep"]
    assert "Saga OrderSaga status: COMPLETED" in lines
    assert not any("refunded" in line or "released" in line for line in lines)


def test_failure_scenario_compensates_in_reverse_and_reports_the_error(output):
    lines = section(output, "Scenario 2")
    completed = [line.split()[2] for line in lines if line.startswith("Step completed:")]
    assert completed == ["ReserveInventoryStep", "ProcessPaymentStep"]
    refund = next(i for i, line in enumerate(lines) if "payment: refunded 42.50" in line)
    release = next(i for i, line in enumerate(lines) if "released reservation-456" in line)
    failed = lines.index("Saga failed: cannot ship to 'Atlantis'")
    assert refund < release < failed
    assert "Saga OrderSaga status: FAILED" in lines
    assert "  log: ShipOrderStep act FAILED" in lines
    assert "  log: ShipOrderStep compensate COMPENSATED" not in lines
    assert "Stock after rollback: {'item_1': 4, 'item_2': 2}" in lines
    assert "Payments still charged: ['payment-123']" in lines
