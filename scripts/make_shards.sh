#!/usr/bin/env bash
# Split SAVE_PATH/pytorch_model.bin (written by `python SAVE_PATH/zero_to_fp32.py SAVE_PATH
# SAVE_PATH/pytorch_model.bin`) into pytorch_model-0000X-of-0000N.bin shards + index.
#
#   ./scripts/make_shards.sh [SAVE_PATH (default ./ckpt/openalpaca)] [--out_dir DIR] [--max_shard_size 5GB] [--keep_deepspeed]
#
# Writing into SAVE_PATH itself (the default) removes, as the original did, pytorch_model.bin,
# the DeepSpeed checkpoint, latest and zero_to_fp32.py once the shards and the index are written
# (--keep_deepspeed keeps the DeepSpeed state). Works from any directory; relative paths are the caller's.
# PYTHON overrides the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
exec "$PYTHON" "$REPO/scripts/make_shards.py" "$@"
