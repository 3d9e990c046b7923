"""The recovery examples and the README demo run as scripts and tell their story."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(name: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_demo_kills_a_worker_and_recovery_completes_the_saga() -> None:
    lines = run("demo.py", "--discard")
    assert any("worker killed with SIGKILL (exit -9)" in line for line in lines)
    survived = lines[lines.index("2. what survived the crash:") + 1 :]
    assert survived[0].startswith("  status=RUNNING version=3")
    assert [line.split()[0] for line in survived[1:3]] == ["ReserveStock", "ChargeCard"]
    assert "   recover_saga returned COMPLETED" in lines
    final = lines[lines.index("   recover_saga returned COMPLETED") + 1 :]
    assert final[0].startswith("  status=COMPLETED")
    steps = [line.split()[0] for line in final[1:5]]
    assert steps == ["ReserveStock", "ChargeCard", "ShipOrder", "NotifyCustomer"]
    # the checkpointed steps did not run again: one reserve and one charge in the whole output
    assert sum("reserve stock   ->" in line for line in lines) == 1
    assert sum("charge card     ->" in line for line in lines) == 1
    assert not any(line.startswith("The database is kept") for line in lines)


def test_recovery_example_finishes_forward_and_backward() -> None:
    lines = run("saga_recovery.py")
    assert any(line.startswith("  recover_saga -> COMPLETED") and "'credited': True" in line
               for line in lines)
    assert any(line.startswith("  recover_saga -> FAILED") and "'debited': False" in line
               for line in lines)


def test_scheduler_example_recovers_all_interrupted_sagas() -> None:
    lines = run("saga_recovery_scheduler.py")
    assert "interrupted: 3 sagas" in lines
    assert "completed: 3 sagas; left to recover: 0" in lines
