#!/usr/bin/env bash
# The CPU demo: the whole OpenAlpaca recipe teaches a tiny LLaMA to follow instructions.
#
#   bash scripts/demo.sh                      # ~5-6 minutes on 2 idle cores; outputs under ckpt/demo/
#   bash scripts/demo.sh --epochs 1           # extra flags go to train_sft.py
#
# Same code path as the real run: dolly-format data and two-turn conversations (OpenAI messages)
# -> process_dataset.py -> scripts/train_sft.sh
# (DeepSpeed ZeRO-3, 2 CPU ranks, dsconfig/openllama.json with config/demo.yaml) -> the seed's
# zero_to_fp32.py command -> scripts/make_shards.sh -> from_pretrained -> greedy answers through
# the inference code path. Only the data (synthetic, demo/synthetic.py) and the base model
# (random-init, demo/__main__.py) stand in for dolly and OpenLLaMA-7B.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
cd "$REPO"
export PYTHON DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
OUT=${DEMO_DIR:-ckpt/demo}
N_TRAIN=${N_TRAIN:-43200}
N_HELDOUT=${N_HELDOUT:-240}
# Two-turn conversations whose second question is about the first answer (demo/synthetic.py,
# FOLLOW_UPS), trained with the records above: one slot of a step each. Copying the first answer
# in upper case is the harder second turn (the context holds the same words in another order): it
# gets twice the conversations (the held-out split stays even).
N_CHATS=${N_CHATS:-6400}
N_HELDOUT_CHATS=${N_HELDOUT_CHATS:-80}
CHAT_WEIGHTS=${CHAT_WEIGHTS-reverse+upper=2,sort+upper=2}
# Task mix of the train split (the held-out split stays even): the three one-word answers that
# need a lookup (field, n-th word, sum) get twice the samples; TASK_WEIGHTS= gives an even mix.
TASK_WEIGHTS=${TASK_WEIGHTS-field=2,nth=2,add=2}
SAVE="$OUT/openalpaca"
start=$SECONDS
started_at=$(date +%s)
stage() { echo; echo "=== [$((SECONDS - start))s] $*"; }

rm -rf "$OUT" && mkdir -p "$OUT"
stage "1/6 synthetic dolly-format data and conversations (train and held-out, disjoint by construction)"
"$PYTHON" -m demo.synthetic --out_dir "$OUT/data" --n_train "$N_TRAIN" --n_heldout "$N_HELDOUT" --seed 0 \
    --weights "$TASK_WEIGHTS" --n_chats "$N_CHATS" --n_heldout_chats "$N_HELDOUT_CHATS" \
    --chat_weights "$CHAT_WEIGHTS"

stage "2/6 process_dataset.py: dolly -> Alpaca format; conversations checked"
"$PYTHON" process_dataset.py --input "$OUT/data/train.jsonl" --output "$OUT/data/openalpaca.json"
"$PYTHON" process_dataset.py --input "$OUT/data/chats.jsonl" --output "$OUT/data/chats.json"

stage "3/6 base model: sentencepiece tokenizer (bos 1, eos 2) + random-init tiny LLaMA"
"$PYTHON" -m demo base --out_dir "$OUT/base"
bash scripts/exact_tokenizer.sh "$OUT/base" --layout clean  # as for a downloaded OpenLLaMA: lm-eval reads it

stage "4/6 train: DeepSpeed ZeRO-3 on 2 CPU ranks"
bash scripts/train_sft.sh --num_gpus 2 --config config/demo.yaml \
    --model_path "$OUT/base" --data_path "$OUT/data/openalpaca.json,$OUT/data/chats.json" --save_path "$SAVE" "$@"

stage "5/6 the seed's conversion: zero_to_fp32.py, then make_shards.sh"
"$PYTHON" "$SAVE/zero_to_fp32.py" "$SAVE" "$SAVE/pytorch_model.bin"
bash scripts/make_shards.sh "$SAVE" --max_shard_size 2MB

stage "6/6 held-out exact match, greedy, through the inference code path"
"$PYTHON" -m demo eval --base "$OUT/base" --trained "$SAVE" --heldout "$OUT/data/heldout.jsonl" \
    --heldout_chats "$OUT/data/heldout_chats.jsonl" --started_at "$started_at" --report "$OUT/eval.json"
