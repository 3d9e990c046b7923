"""sagakit demo: a real saga on the embedded SQLite default, a crash, and a recovery.

1. A worker process starts an order saga (reserve stock, charge card, ship, notify) on a SQLite
   file and is killed with SIGKILL while the "ship" step is running.
2. The saga row survives the crash: RUNNING, two steps checkpointed, leased by the dead worker.
3. Once the dead worker's lease expires, recovery finishes the saga: the two checkpointed steps
   are not run again; "ship" runs again (its completion was never checkpointed) and the saga
   completes.

Run: ``python examples/demo.py`` (or ``sagakit demo``). Add ``--keep`` to keep the database.
The code lives in :mod:`sagakit.demo`, so the ``sagakit demo`` command can run it too.
"""

import sys

from sagakit.demo import main

if __name__ == "__main__":
    sys.exit(main())
