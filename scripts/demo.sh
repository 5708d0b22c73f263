#!/usr/bin/env bash
# Set everything up, then run the embedded default main job: ONE real local Flower federation of four
# report sites (real reports, SmolLM2-135M) and six prostate MRI segmentation sites (real slices,
# LiteMedSAM), embedded Chroma, that enrols every site and runs the leave-one-site-out evaluation of
# each family (ROUGE-L, DICE). `--families report` or `--families segmentation` runs one family.
# Extra arguments go to `python -m deploy.demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
# the data sets come from the data root ($RPE_DATA_DIR, else ../shared/data): stop at once if one is missing
PY=${PYTHON:-python3}; [ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -c 'import sys
from common.families.report.data import REPORT_DATASETS, DatasetMissingError, dataset_dir
try:
    [dataset_dir(name) for name in (*REPORT_DATASETS, "prostate-multisite")]
except DatasetMissingError as exc:
    sys.exit(f"[demo] {exc}")' || exit 2
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 ANONYMIZED_TELEMETRY=False
export PATH="$PWD/.venv/bin:$PATH"   # the SuperLink starts flower-superexec by name
exec .venv/bin/python -m deploy.demo "$@"
