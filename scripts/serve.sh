#!/usr/bin/env bash
# Serve a model folder with an OpenAI-compatible API (transformers serve, with bad requests refused as 4xx):
#
#   ./scripts/serve.sh                                   # ./ckpt/openalpaca at http://127.0.0.1:8000/v1
#   ./scripts/serve.sh ./ckpt/demo/openalpaca --port 8001
#   ./scripts/serve.sh MODEL --continuous_batching       # concurrent requests share generation steps
#
# Binds to 127.0.0.1 unless --host says otherwise; see serve/server.py and --help.
# PYTHON overrides the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m serve.server "$@"
