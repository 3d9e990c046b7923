#!/usr/bin/env bash
# The README's second command: set up .venv if needed, start the local database servers, lint,
# type-check, and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
# Mermaid's own parser checks the diagrams sagakit draws (tests/unit/test_diagram.py).
if command -v npm >/dev/null 2>&1; then
    if [ ! -d .cache/mermaid/node_modules/mermaid ]; then
        mkdir -p .cache/mermaid
        (cd .cache/mermaid && npm install --silent --no-audit --no-fund mermaid@11.17 jsdom@29 >/dev/null)
    fi
    export SAGAKIT_MERMAID_DIR="$PWD/.cache/mermaid"
fi
.venv/bin/ruff check src tests examples benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
