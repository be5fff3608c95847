#!/usr/bin/env bash
# The whole test suite, from a fresh machine: install, lint, type-check, start PostgreSQL and Kafka, run pytest,
# stop what was started. Extra arguments go to pytest (e.g. scripts/test.sh -k definitions).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== import contracts"; .venv/bin/lint-imports
echo "== services"
trap 'scripts/services.sh stop all' EXIT
scripts/services.sh start all
eval "$(scripts/services.sh env)"
eval "$(scripts/browser.sh env)"   # Debian's chromium + chromium-driver for the console's browser tests
echo "== pytest"
.venv/bin/pytest "$@"
