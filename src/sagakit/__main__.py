"""``python -m sagakit``: the ``sagakit`` command (see :mod:`sagakit.cli`)."""

import sys

from sagakit.cli import main

if __name__ == "__main__":
    sys.exit(main())
