"""train_sft.py plus the trained engine's own logits on a fixed probe at the very end of the run,
added from outside: the reference that bench/gpu_check.py and tests/test_export_multirank.py
compare every exported folder against (``TRAIN_ENTRY=bench/probe_train.py scripts/train_sft.sh``).

    PROBE_OUT=FILE python -m deepspeed.launcher.runner --num_gpus 2 bench/probe_train.py <train_sft.py flags>

After ``train_sft.finish`` (the last checkpoint is written), every rank runs the ZeRO-3 engine's
forward on ``PROBE`` (each forward gathers the partitioned weights, so every rank must take part)
and rank 0 saves ``{"input_ids": PROBE, "logits": ...}`` to ``PROBE_OUT``: the reference every
exported folder is compared against. The trainer itself carries no hook.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

import train_sft

# A fixed probe: bos, ordinary ids, an eos and a bos in the middle (ids < 64 exist in any tiny vocab).
PROBE = torch.tensor([[1, 40, 17, 33, 9, 21, 2, 1, 28, 12, 45, 6]])
real_finish = train_sft.finish


@torch.no_grad()
def probing_finish(run, engine, cfg, save, tag, step):
    real_finish(run, engine, cfg, save, tag, step)
    engine.eval()
    logits = engine(input_ids=PROBE.to(engine.device)).logits.float().cpu()
    if dist.get_rank() == 0:
        torch.save({"input_ids": PROBE, "logits": logits}, os.environ["PROBE_OUT"])


if __name__ == "__main__":
    train_sft.finish = probing_finish
    sys.exit(train_sft.main())
