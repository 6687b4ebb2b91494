#!/usr/bin/env bash
# One command from a DeepSpeed ZeRO-3 checkpoint to a Hugging Face folder, streaming weight by
# weight (see model/export.py for how and why):
#
#   ./scripts/export_hf.sh SAVE_PATH OUT_DIR [--dtype bf16|fp16|fp32] [--safetensors|--bin]
#                          [--max_shard_size 5GB] [--tag TAG] [--overwrite]
#
# Works from any directory; relative paths are taken from the caller's.
# PYTHON overrides the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m model.export "$@"
