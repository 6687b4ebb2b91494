#!/usr/bin/env bash
# Evaluate models with lm-evaluation-harness (hf backend, one device, the exact tokenizer) and write
# a side-by-side report: lm-eval's JSON per model, report.md (the table, also printed), report.png.
#
#   ./scripts/eval.sh ./openllama_ckpt ckpt/openalpaca                 # OpenLLaMA's README suite, zero-shot
#   ./scripts/eval.sh ./openllama_ckpt ckpt/openalpaca --preset instruct --limit 50   # ifeval, gsm8k, chat template
#   bash scripts/demo.sh && ./scripts/eval.sh ckpt/demo/base ckpt/demo/openalpaca --preset demo
#   ./scripts/eval.sh MODEL --tasks arc_easy,piqa --dry_run           # print the lm_eval commands only
#   ./scripts/eval.sh MODEL ... -- --log_samples                      # flags after -- go to lm_eval run
#
# MODEL: an HF folder, a base folder with tokenizer.model, the trainer's save path (exported on the
# fly into the output dir) or a hub id. The first MODEL is the baseline. See openalpaca/lmeval.py.
# Works from any directory; relative paths are taken from the caller's.
# PYTHON overrides the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m openalpaca.lmeval "$@"
