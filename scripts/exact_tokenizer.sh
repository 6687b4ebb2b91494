#!/usr/bin/env bash
# Add the exact tokenizer.json and the recipe's chat template to a model folder that has only
# tokenizer.model (a downloaded OpenLLaMA, say), so AutoTokenizer and every tool built on it
# (lm-eval, vLLM, transformers serve) give the ids sentencepiece gives (see model/hf_tokenizer.py):
#
#   ./scripts/exact_tokenizer.sh ./openllama_ckpt                  # writes into the folder
#   ./scripts/exact_tokenizer.sh ./openllama_ckpt --layout clean   # the fast recipe's chat template
#   ./scripts/exact_tokenizer.sh ./openllama_ckpt --out_dir ./openllama_tokenizer   # a folder beside it
#
# The trainer's save path and both exports get these files by themselves.
# PYTHON overrides the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m model.hf_tokenizer "$@"
