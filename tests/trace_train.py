"""train_sft.py with its first optimizer step's micro-batches recorded: a test-only entry point.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/trace_train.py --config ... (train_sft flags)

Each rank saves the micro-batches it trained on in its first step (as ``train_step`` received
them) to ``$TRACE_DIR/rank{R}.pt``, then trains on unchanged. The trainer itself carries no hook.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train_sft  # noqa: E402

real_step = train_sft.train_step


def traced_step(engine, batches, world):
    out = Path(os.environ["TRACE_DIR"]) / f"rank{dist.get_rank()}.pt"
    if not out.exists():
        torch.save([{k: v for k, v in b.items()} for b in batches], out)
    return real_step(engine, batches, world)


train_sft.train_step = traced_step

if __name__ == "__main__":
    sys.exit(train_sft.main())
