"""train_sft.py as some tests launch it: the same trainer, plus what only tests need, from outside.

    TRACE_DIR=DIR python -m deepspeed.launcher.runner --num_gpus 2 tests/trace_train.py <train_sft.py flags>

- ``DIR/rank{R}.pt``: the micro-batches rank R trained on in its first step, as ``train_step`` got them;
- ``DIR/samples_rank{R}.jsonl``: which records rank R trained on, step by step (appended, so a
  resumed run adds to it);
- ``CRASH_AT_SAVE=N``: SIGKILL the whole launch halfway through writing checkpoint N (after the
  rank files, before the rename that makes it ``latest``);
- ``DIR/exit_rank{R}.json``: what ``main`` returned on rank R, and whether the process group was
  still alive then (a group left to interpreter teardown can abort the process at exit).

The trainer itself carries no hook: everything here wraps its functions.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

import train_sft
from openalpaca.batching import Batching

TRACE = Path(os.environ.get("TRACE_DIR", "."))
real_step, real_micro_batches, real_build = train_sft.train_step, Batching.micro_batches, train_sft.build_engine


def traced_step(engine, batches, world):
    first = TRACE / f"rank{dist.get_rank()}.pt"
    if not first.exists():
        torch.save([dict(b) for b in batches], first)
    return real_step(engine, batches, world)


def traced_micro_batches(self, dataset, step):
    batches = real_micro_batches(self, dataset, step)
    with open(TRACE / f"samples_rank{self.rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step + 1, "ids": [i for b in batches for i in b["sample_ids"]]}) + "\n")
    return batches


def crashing_engine(cfg, ds_config):
    engine = real_build(cfg, ds_config)
    real_save, crash_tag = engine.save_checkpoint, f"{train_sft.TMP_PREFIX}global_step{os.environ.get('CRASH_AT_SAVE')}"

    def save_checkpoint(save_dir, tag=None, **kwargs):
        result = real_save(save_dir, tag=tag, **kwargs)
        if tag == crash_tag:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return result

    engine.save_checkpoint = save_checkpoint
    return engine


if __name__ == "__main__":
    train_sft.train_step = traced_step
    Batching.micro_batches = traced_micro_batches
    if os.environ.get("CRASH_AT_SAVE"):
        train_sft.build_engine = crashing_engine
    status = train_sft.main()
    exit_state = {"status": status, "process_group_alive": dist.is_initialized()}
    (TRACE / f"exit_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(exit_state))
    sys.exit(status)
