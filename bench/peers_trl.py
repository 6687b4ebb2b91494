"""TRL's SFTTrainer on bench/peers.py's job: one rank of it, started by torchrun.

    torchrun --standalone --nproc_per_node 2 bench/peers_trl.py JOB.json

JOB.json (written by bench/peers.py) names the model folder, the pre-tokenized samples (JSON
lines of ``input_ids`` and ``completion_mask``, built by ``openalpaca.prompts`` so the ids are the
fast recipe's), the resolved DeepSpeed JSON and the hyper-parameters. TRL runs as its
documentation advises for this job: padding-free batches (``padding_free=True``: each
micro-batch's samples flattened into one row with their own position ids), loss on completions
only (``completion_only_loss=True``), DeepSpeed ZeRO-3 through the Trainer's accelerate
integration (``deepspeed=`` the same JSON the project's trainer gets, every value filled).
Gradient checkpointing is off and the precision is the job's, as in the other runs (TRL's
defaults would turn both on).

What it writes into ``out_dir``: ``logs/summary.json`` with the keys bench/peers.py reads from the
project's trainer (steps, supervised_tokens, train_seconds, final_loss), the trained weights as an
HF folder (``model/``: gathered from the ZeRO-3 partitions after training; ``supervised_tokens`` is
counted in the micro-batches TRL trains on, ``CountingCollator``) and, through
``PEERS_MEMORY_DIR``, each rank's peak memory.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers_ours import record_peak_memory


class CountingCollator:
    """TRL's own collator, counting the targets of every micro-batch it hands the model: the
    positions whose label is not -100 after the model's one-token shift. That is what TRL trains
    on (completion tokens only, a sample's first token masked by its padding-free collator), read
    from the batches themselves rather than from the data file."""

    def __init__(self, collate) -> None:
        self.collate, self.targets = collate, 0

    def __call__(self, features):
        batch = self.collate(features)
        self.targets += int((batch["labels"][..., 1:] != -100).sum())
        return batch


def all_ranks_sum(value: int) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def timing_callback():
    """A callback noting the wall time of the training loop, first step to last (no set-up, no save)."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self) -> None:
            self.start = self.end = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.time()

    return Timing()


def save_gathered(model, out: Path) -> None:
    """Write the trained weights as an HF folder; ZeRO-3 partitions are gathered on every rank first."""
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if dist.get_rank() == 0:
            state = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
            out.mkdir(parents=True, exist_ok=True)
            save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(out)
    dist.barrier()


def main(job_path: str) -> None:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from datasets import Dataset

    job = json.loads(Path(job_path).read_text())
    out = Path(job["out_dir"])
    rows = [json.loads(line) for line in Path(job["data"]).read_text().splitlines()]
    # The config comes first: while it lives, from_pretrained loads straight into ZeRO-3 partitions.
    args = SFTConfig(
        output_dir=str(out), deepspeed=job["ds_config"], num_train_epochs=1,
        per_device_train_batch_size=job["per_device_batch"], gradient_accumulation_steps=job["accumulation"],
        learning_rate=job["lr"], adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=job["weight_decay"],
        max_grad_norm=job["clipping"], warmup_steps=job["warmup_steps"], seed=job["seed"],
        bf16=job["dtype"] == "bf16", fp16=False, gradient_checkpointing=False,
        padding_free=True, packing=False, max_length=None, completion_only_loss=True,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    _ = args.device  # sets up the process group (on CPU accelerate's: gloo, as a multi-CPU run)
    # On CPU accelerate leaves DeepSpeed's communication layer unset, and ZeRO-3's partitioned loading
    # would then see a world of one: hand it the process group (a no-op where accelerate did it).
    deepspeed.init_distributed()
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32,
                                                 attn_implementation=job["attn_implementation"])
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"])
    timing = timing_callback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[timing])
    counting = trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.train()
    save_gathered(trainer.model, out / "model")
    trained = all_ranks_sum(counting.targets)
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        summary = {"steps": trainer.state.global_step, "supervised_tokens": trained,
                   "train_seconds": timing.end - timing.start, "final_loss": losses[-1] if losses else None,
                   "checkpoint": str(out / "model")}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    record_peak_memory()
    main(sys.argv[1])
