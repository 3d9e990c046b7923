#!/usr/bin/env bash
# The README's first command: set up .venv if needed, then run the crash-and-recovery demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
