#!/usr/bin/env bash
# A web chat page (gradio) over an OpenAI-compatible server:
#
#   ./scripts/chat.sh                              # http://127.0.0.1:8000/v1, as scripts/serve.sh starts it
#   ./scripts/chat.sh http://HOST:PORT/v1          # any OpenAI-compatible server (vllm serve FOLDER too)
#   ./scripts/chat.sh ./ckpt/openalpaca            # starts scripts/serve.sh for the folder first
#
# The page is at http://127.0.0.1:7860 (--host, --port); see serve/chat.py and --help.
# PYTHON overrides the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m serve.chat "$@"
