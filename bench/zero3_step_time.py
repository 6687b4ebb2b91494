"""Where a ZeRO-3 step's time goes: forward, backward and optimizer step, against plain PyTorch.

Launch it like the trainer (it reads the same config and flags) and it times 50 steps of the
engine, then 50 steps of the same model in plain PyTorch on the same micro-batches, per rank:

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python -m deepspeed.launcher.runner --num_gpus 2 \\
        bench/zero3_step_time.py --config config/demo.yaml --model_path ckpt/demo/base \\
        --data_path ckpt/demo/data/openalpaca.json --save_path /tmp/zero3_step_time \
        --pack false --max_tokens_per_micro_batch 0 --micro_batch_size 16 [--zero_overrides ""]

It times padded micro-batches of ``micro_batch_size`` samples (one per optimizer step), hence
``--pack false`` over config/demo.yaml's packing. The numbers behind config/demo.yaml's
``zero_overrides`` (docs/results.md, ZeRO-3 on CPU). The last line is JSON: milliseconds per
step of each phase, averaged over the ranks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_sft  # noqa: E402
from model.llama import load_model  # noqa: E402
from openalpaca.config import load_config  # noqa: E402
from openalpaca.distributed import init_distributed  # noqa: E402
from openalpaca.loss import num_targets, token_ce_sum  # noqa: E402

WARMUP, STEPS = 10, 50


def time_steps(name: str, forward, backward, step, batches, rank: int) -> dict[str, float]:
    dist.barrier()
    spent = torch.zeros(3, dtype=torch.float64)
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = forward(batch)
        t1 = time.perf_counter()
        backward(loss)
        t2 = time.perf_counter()
        step()
        t3 = time.perf_counter()
        if i >= WARMUP:
            spent += torch.tensor([t1 - t0, t2 - t1, t3 - t2], dtype=torch.float64)
    fwd, bwd, opt = (1000 * spent / (len(batches) - WARMUP)).tolist()
    print(f"rank {rank} {name}: forward {fwd:.1f} ms, backward {bwd:.1f} ms, step {opt:.1f} ms, "
          f"total {fwd + bwd + opt:.1f} ms", flush=True)
    mean = torch.tensor([fwd, bwd, opt], dtype=torch.float64)
    dist.all_reduce(mean)
    fwd, bwd, opt = (mean / dist.get_world_size()).tolist()
    return {"forward": round(fwd, 1), "backward": round(bwd, 1), "step": round(opt, 1),
            "total": round(fwd + bwd + opt, 1)}


def main() -> None:
    cfg = load_config([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    data = train_sft.prepare(cfg, int(os.environ["WORLD_SIZE"]))
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)
    batching = train_sft.make_batching(cfg, world, rank)
    batches = [batching.micro_batches(data.train_set, i)[0] for i in range(WARMUP + STEPS)]

    def loss_of(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_ce_sum(logits, batch["labels"]) / max(1, num_targets(batch["labels"]))

    engine = train_sft.build_engine(cfg, data.ds_config)
    result = {"deepspeed_ms": time_steps("deepspeed", lambda b: loss_of(engine, b), engine.backward, engine.step,
                                         batches, rank)}

    model = load_model(cfg.model_path)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))

    def plain_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result["plain_pytorch_ms"] = time_steps("plain PyTorch", lambda b: loss_of(model, b), lambda loss: loss.backward(),
                                            plain_step, batches, rank)
    if rank == 0:
        print(json.dumps({**result, "world_size": world, "micro_batch_size": cfg.micro_batch_size,
                          "zero_overrides": cfg.zero_overrides}))


if __name__ == "__main__":
    main()
