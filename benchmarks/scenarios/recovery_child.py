"""One RecoveryWorker in its own process, for the recovery section's subprocess mode.

Run as ``python recovery_child.py '<json config>'``. Prints ``ready`` once its engine is
connected, starts on a ``go`` line on stdin, stops gracefully on a ``stop`` line (or at end of
input, or after its deadline), then prints one JSON line: what it did and the CPU it used.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the repository (tests.)


async def _readline() -> str:
    return await asyncio.to_thread(sys.stdin.readline)


async def main(config: dict) -> None:
    from sagakit import RecoveryWorker, SagaStatus
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
    from scenarios.common import saga_class

    conc = int(config["concurrency"])
    storage = SqlAlchemySagaStorage.from_url(config["url"], pool_size=conc + 2, max_overflow=0,
                                             **config["tables"])
    worker = RecoveryWorker(storage, [saga_class(5)], concurrency=conc, poll_interval=0.05)
    try:
        async with storage.engine.connect():
            pass
        print("ready", flush=True)
        if (await _readline()).strip() != "go":
            return
        cpu0 = time.process_time()
        run = asyncio.ensure_future(worker.run(install_signal_handlers=False))
        stop = asyncio.ensure_future(_readline())
        await asyncio.wait({run, stop}, timeout=float(config["deadline_s"]),
                           return_when=asyncio.FIRST_COMPLETED)
        worker.stop()
        await asyncio.wait_for(run, 60)
        cpu = time.process_time() - cpu0
        outcomes = worker.outcomes
        errors = [o for o in outcomes if o.error is not None and not o.busy]
        print(json.dumps({
            "attempts": len(outcomes),
            "completed": [str(o.saga_id) for o in outcomes if o.status is SagaStatus.COMPLETED],
            "busy": sum(1 for o in outcomes if o.busy),
            "errors": len(errors),
            "first_error": repr(errors[0].error)[:300] if errors else None,
            "cpu_s": cpu,
        }), flush=True)
        stop.cancel()
    finally:
        await storage.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
    # The stdin reader thread may still be blocked in readline: do not wait for it.
    sys.stdout.flush()
    import os

    os._exit(0)
