#!/usr/bin/env bash
# Fine-tune with the DeepSpeed launcher (ZeRO-3), run from the repository root.
#
#   ./scripts/train_sft.sh                                  # all local GPUs, the seed's paths
#   ./scripts/train_sft.sh --num_gpus 2 --save_path ./ckpt/run2
#   ./scripts/train_sft.sh --hostfile hostfile --master_addr node1   # multi-node: the launcher's job
#
# Launcher flags (--num_gpus, --num_nodes, --hostfile, --include, --exclude, --master_addr,
# --master_port) go to `deepspeed`; every other flag goes to train_sft.py and overrides
# the YAML (--config, default config/openllama.yaml; see `python train_sft.py --help`).
# On a machine without GPUs, --num_gpus N starts N CPU ranks (gloo).
#
# Two nodes without ssh (each started by hand, or by your scheduler, with its own --node_rank):
#   ./scripts/train_sft.sh --hostfile hostfile --no_ssh --node_rank 0 --num_nodes 2 --master_addr node1
#
# Preemption: SIGTERM or SIGINT to this script (or to its whole process group, as schedulers send
# it) reaches the ranks only, once: they finish the optimizer step they are in, save a checkpoint,
# say how to resume, and the script exits 0; further signals are not passed on. The DeepSpeed launcher runs in a session of its own, so
# its own handler (kill the ranks 30 s after a signal, exit 1) never cuts a save short.
# TRAIN_ENTRY names the Python file the ranks run (default train_sft.py), e.g. a profiling wrapper.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
cd "$REPO"

launcher=()
args=()  # the defaults (./openllama_ckpt, ./openalpaca.json, ./ckpt/openalpaca) come from the config
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_gpus|--num_nodes|--hostfile|--include|--exclude|--master_addr|--master_port|--node_rank)
      launcher+=("$1" "$2"); shift 2 ;;
    --no_ssh)
      launcher+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

# A free port unless one is given: two runs on one machine must not both take DeepSpeed's 29500.
if [[ " ${launcher[*]} " != *" --master_port "* ]]; then
  launcher+=(--master_port "$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')")
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
if [[ "$DS_ACCELERATOR" == cpu && -z "${OMP_NUM_THREADS:-}" ]]; then
  # CPU ranks share the cores: without a cap each rank starts one thread per core and they thrash.
  ranks=1
  for ((i = 0; i < ${#launcher[@]}; i++)); do [[ "${launcher[i]}" == --num_gpus ]] && ranks=${launcher[i + 1]}; done
  cores=$(nproc)
  export OMP_NUM_THREADS=$(( cores / ranks > 0 ? cores / ranks : 1 ))
fi
# The launcher leads a new session (os.setsid), out of reach of signals sent to this script's group.
"$PYTHON" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' \
    "$PYTHON" -m deepspeed.launcher.runner "${launcher[@]}" "${TRAIN_ENTRY:-train_sft.py}" "${args[@]}" &
session=$!
forwarded=""
forward() {  # once: a second signal must not reach ranks that are already saving or exiting
  [[ -n "$forwarded" ]] && return 0
  forwarded=1
  pkill -TERM -s "$session" -f -- '--local_rank=' || true
}
trap forward TERM INT
while kill -0 "$session" 2>/dev/null; do
  wait "$session" || true  # a trapped signal ends `wait` early: wait again
done
wait "$session" && exit 0 || exit $?  # the launcher's own exit status
