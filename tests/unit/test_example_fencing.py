"""examples/fencing_service.py runs as a script: the paused worker's late charge is refused by
the payment service, and its run writes nothing to the saga."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fencing_service.py"


def test_the_paused_workers_late_charge_is_refused_and_the_ledger_balances() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert "worker 2: took the saga over and recovered it: FAILED" in lines
    assert any(line.startswith("worker 1: its charge was refused: StaleRequest") for line in lines)
    assert "worker 1: its run ended with SagaLeaseLostError" in lines
    assert ("saga: FAILED, as worker 2 left it (ChargeCard act COMPLETED, ShipOrder act FAILED, "
            "ChargeCard compensate COMPENSATED)") in lines
    start = lines.index("requests the payment service received:")
    assert lines[start + 1 : start + 4] == [
        "  1. charge token 2  charged",
        "  2. refund token 2  refunded",
        "  3. charge token 1  refused: stale token (2 seen)",
    ]
    assert any(line.startswith("ledger: pay-") and line.endswith("charged with token 2, refunded")
               for line in lines)
    assert any(line.startswith("a late charge with the refunded key and token 2: refused")
               and "this charge key was refunded" in line for line in lines)
    assert any(line.startswith("a charge arriving after its refund: refused")
               for line in lines)
