"""examples/saga_forward_recovery.py runs as a script and tells its five stories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "saga_forward_recovery.py"


@pytest.fixture(scope="module")
def output() -> list[str]:
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [line.strip() for line in done.stdout.splitlines()]


def scenario(lines: list[str], number: int) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== Scenario {number}"))
    rest = lines[start + 1:]
    end = next((i for i, line in enumerate(rest) if line.startswith("== ")), len(rest))
    return rest[:end]


def test_a_flaky_gateway_is_retried_until_the_card_is_charged(output: list[str]) -> None:
    lines = scenario(output, 1)
    assert lines.count("payment gateway: connection reset") == 2
    assert "card charged 30 (pay-o-1)" in lines
    assert lines[-1] == "saga status: COMPLETED"


def test_a_declined_card_is_not_retried_and_the_stock_is_released(output: list[str]) -> None:
    lines = scenario(output, 2)
    assert lines.count("card declined") == 1
    assert "stock released (res-o-2)" in lines
    assert lines[-1] == "saga status: FAILED"


def test_shipping_past_the_pivot_is_retried(output: list[str]) -> None:
    lines = scenario(output, 3)
    assert lines.count("courier: no answer") == 2
    assert lines[-1] == "saga status: COMPLETED"


def test_past_the_pivot_nothing_is_refunded_the_saga_parks_and_resumes(output: list[str]) -> None:
    lines = scenario(output, 4)
    assert lines.count("courier: no answer") == 4
    assert not any("refunded" in line or "released" in line for line in lines)
    assert "saga status: PARKED" in lines
    assert lines[-1] == "resumed after the fix: COMPLETED"


def test_a_long_wait_holds_no_process_and_a_worker_finishes_it(output: list[str]) -> None:
    lines = scenario(output, 5)
    assert "saga status: WAITING" in lines
    assert lines[-1].endswith("COMPLETED")
