#!/usr/bin/env bash
# Run the whole test suite (lint + layer contracts + unit + integration). CI calls exactly this.
# The fast loop while editing (< 2 min on 2 cores): .venv/bin/python -m pytest -q -m "not integration" -n 2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 ANONYMIZED_TELEMETRY=False
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# types of the core packages ([tool.mypy] in pyproject.toml: check_untyped_defs, no implicit Optional)
.venv/bin/mypy common/adapters common/protocol server/registry
# layer rules ([tool.importlinter] in pyproject.toml): a forbidden import, even a lazy one, fails CI
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/lint-imports --no-cache
export PATH="$PWD/.venv/bin:$PATH"
# test files run on 3 workers (-n 3, one file per worker): the integration tests mostly wait on real
# processes and the network, so this halves the wall time on the 2-core CI machine
.venv/bin/python -m pytest -q -n 3 --dist loadfile --durations=25 "$@"
