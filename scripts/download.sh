#!/usr/bin/env bash
# Download an OpenLLaMA checkpoint (needs internet):
#   bash scripts/download.sh [MODEL_ID (default openlm-research/open_llama_7b)] [OUT_DIR (default ./openllama_ckpt)]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m model.download "$@"
