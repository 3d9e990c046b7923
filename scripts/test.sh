#!/usr/bin/env bash
# The README's second command: set up .venv if needed, start the local database servers, lint,
# type-check, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/ruff check src tests examples benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
