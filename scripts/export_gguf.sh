#!/usr/bin/env bash
# A model folder (the trainer's save path, an HF folder, a base folder) to GGUF files for llama.cpp, ollama and
# LM Studio, each with an ollama Modelfile beside it (llama.cpp's own converter and quantizer; see model/gguf.py):
#
#   ./scripts/export_gguf.sh ./ckpt/openalpaca                         # ./ckpt/openalpaca-q8_0.gguf (+ .Modelfile)
#   ./scripts/export_gguf.sh ./ckpt/openalpaca --quant f16,q8_0,q4_k_m  # one file per type
#   ./scripts/export_gguf.sh ./ckpt/openalpaca --quant q4_k_m --out ~/models/alpaca.gguf
#
# Works from any directory; relative paths are taken from the caller's.
# PYTHON overrides the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m model.gguf "$@"
