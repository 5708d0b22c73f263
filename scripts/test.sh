#!/usr/bin/env bash
# Run the whole test suite (lint + unit + integration). CI calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 ANONYMIZED_TELEMETRY=False
.venv/bin/ruff check .
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/python -m pytest -q "$@"
