"""Find the CPU demo's recipe fast: plain PyTorch, one process, no DeepSpeed.

The demo must show a tiny random-init LLaMA learning the synthetic instruction tasks
(``openalpaca.synthetic``) within minutes on 2 cores. Whether it does depends on the
tokenizer, the model shape, steps per second and the LR schedule, so this probe measures
exactly those with the demo's own pieces: ``train_tokenizer`` on ``corpus_texts()``,
``encode_sample`` for the training layout (loss only on the response), ``llama_config`` for
the model and ``greedy_predictions`` for held-out exact match, before and after training.

    .venv/bin/python bench/probe_demo.py --threads 1 --lr 7e-4 --steps 1300 --n_train 41600 \
        --weights field=2,nth=2,add=2                                           # the demo's recipe
    .venv/bin/python bench/probe_demo.py --hidden 192 --lr 3e-3 --steps 400

The defaults (lr 2e-3, 600 steps) are the starting point the README's early probe figures vary
from, not the demo's recipe; the tokenizer is the demo's (vocab bound 1024; those early figures
used 4096).

It prints a per-task table, training time, tokens/s and the recipe as JSON. Seeds are fixed:
two runs on the same machine give the same numbers (timings aside).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from model.tiny import llama_config, tokenizer_vocab_size, train_tokenizer  # noqa: E402
from openalpaca import synthetic  # noqa: E402
from openalpaca.data import collate  # noqa: E402
from openalpaca.evaluate import greedy_predictions  # noqa: E402
from openalpaca.prompts import IGNORE_INDEX, encode_sample  # noqa: E402


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup to the peak, then cosine down to ``min_ratio`` of it at the last step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def evaluate(
    model, tokenizer, records, batch_size: int, max_new_tokens: int, show: int = 0
) -> tuple[float, dict[str, float], float]:
    """Held-out exact match (overall, per task, seconds); prints up to ``show`` misses per task."""
    start = time.perf_counter()
    predictions = greedy_predictions(model, tokenizer, records, batch_size, max_new_tokens)
    overall, per_task = synthetic.score(records, predictions)
    seconds = time.perf_counter() - start
    shown: dict[str, int] = {}
    for record, prediction in zip(records, predictions):
        task = record["category"]
        if not synthetic.exact_match(prediction, record["response"]) and shown.get(task, 0) < show:
            shown[task] = shown.get(task, 0) + 1
            print(f"  miss {task}: {record['instruction']!r} {record['context']!r} -> {prediction!r} "
                  f"(want {record['response']!r})")
    return overall, per_task, seconds


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--n_heldout", type=int, default=270)
    p.add_argument("--weights", default="", help='task mix, e.g. "sort=2,nth=1.5"')
    p.add_argument("--vocab_size", type=int, default=synthetic.TOKENIZER_VOCAB_SIZE,
                   help="upper bound; the corpus decides (default: the demo's)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=0, help="0 means 4 * hidden")
    p.add_argument("--init_std", type=float, default=0.02, help="std of the random init (HF default 0.02)")
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--min_lr_ratio", type=float, default=0.0)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--loss_per_sample", action="store_true", help="mean over each sample's tokens, then samples")
    p.add_argument("--no_shuffle", action="store_true", help="take train samples in file order (a curriculum)")
    p.add_argument("--eval_batch", type=int, default=96)
    p.add_argument("--max_new_tokens", type=int, default=12)
    p.add_argument("--show", type=int, default=2, help="held-out misses to print per task")
    p.add_argument("--eval_every", type=int, default=0, help="extra held-out evals (time not counted)")
    p.add_argument("--save_dir", type=Path, default=None, help="save the trained model and tokenizer here")
    p.add_argument("--work_dir", type=Path, default=None, help="where the tokenizer goes (default: a temp dir)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    weights = synthetic.parse_weights(args.weights)
    wall_start = time.perf_counter()

    train_records = synthetic.make_split(args.n_train, "train", args.seed, weights=weights)
    heldout = synthetic.make_split(args.n_heldout, "heldout", args.seed)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="probe_demo_"))
    train_tokenizer(synthetic.corpus_texts(seed=args.seed), work_dir, args.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(work_dir)
    vocab = tokenizer_vocab_size(work_dir)
    encoded = [
        encode_sample(tokenizer, r["instruction"], r["context"], r["response"], args.max_length) for r in train_records
    ]
    samples = [s for s in encoded if s is not None]
    truncated = sum(s.truncated for s in samples)
    print(f"data: {len(samples)} train samples ({len(encoded) - len(samples)} skipped, {truncated} truncated), "
          f"{len(heldout)} held-out, vocab {vocab}, mean length "
          f"{sum(len(s.input_ids) for s in samples) / len(samples):.1f}")

    torch.manual_seed(args.seed)
    config = llama_config(
        vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        intermediate_size=args.intermediate or None, max_position_embeddings=args.max_length,
    )
    config.initializer_range = args.init_std
    config.tie_word_embeddings = args.tie
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    before, before_tasks, _ = evaluate(model, tokenizer, heldout, args.eval_batch, args.max_new_tokens)
    print(f"model: {n_params / 1e6:.2f}M params; held-out exact match before training: {before:.3f}")

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps, args.min_lr_ratio))
    order = (list(range(len(samples))) if args.no_shuffle else
             torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist())
    cursor, tokens, train_time = 0, 0, 0.0
    model.train()
    for step in range(args.steps):
        tick = time.perf_counter()
        if cursor + args.batch > len(order):
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed + step)).tolist()
            cursor = 0
        batch = collate([samples[i] for i in order[cursor : cursor + args.batch]])
        cursor += args.batch
        if args.loss_per_sample:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                   reduction="none")
            loss = (ce.sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1)).mean()
        else:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        train_time += time.perf_counter() - tick
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1:4d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"train {train_time:6.1f}s  {(step + 1) / train_time:.2f} steps/s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            mid, mid_tasks, _ = evaluate(model, tokenizer, heldout, args.eval_batch, args.max_new_tokens)
            print(f"  eval@{step + 1}: {mid:.3f}  " + " ".join(f"{t}={v:.2f}" for t, v in sorted(mid_tasks.items())), flush=True)

    after, after_tasks, eval_time = evaluate(
        model, tokenizer, heldout, args.eval_batch, args.max_new_tokens, show=args.show
    )
    wall = time.perf_counter() - wall_start
    if args.save_dir:
        model.save_pretrained(args.save_dir)
        tokenizer.save_pretrained(args.save_dir)

    print(f"\n{'task':10s} {'n':>4s} {'before':>7s} {'after':>7s}")
    counts = {t: sum(r["category"] == t for r in heldout) for t in synthetic.TASKS}
    for task in synthetic.TASKS:
        print(f"{task:10s} {counts[task]:4d} {before_tasks.get(task, 0):7.3f} {after_tasks.get(task, 0):7.3f}")
    print(f"{'overall':10s} {len(heldout):4d} {before:7.3f} {after:7.3f}")
    print(f"\ntrain {train_time:.1f}s ({args.steps / train_time:.2f} steps/s, {tokens / train_time:.0f} tokens/s), "
          f"held-out eval {eval_time:.1f}s, wall {wall:.1f}s, load average {os.getloadavg()[0]:.2f}")
    recipe = {
        "seed": args.seed,
        "tokenizer": {"corpus": "synthetic.corpus_texts", "vocab_size_arg": args.vocab_size, "vocab_size": vocab},
        "model": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                  "intermediate_size": config.intermediate_size,
                  "initializer_range": args.init_std,
                  "tie_word_embeddings": args.tie, "params_M": round(n_params / 1e6, 3)},
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "grad_clip": 1.0},
        "schedule": {"warmup_steps": args.warmup, "decay": "cosine", "min_lr_ratio": args.min_lr_ratio},
        "batch_size": args.batch,
        "steps": args.steps,
        "samples_seen": args.steps * args.batch,
        "n_train": args.n_train,
        "task_weights": weights,
        "max_length": args.max_length,
        "n_heldout": len(heldout),
        "result": {"before": round(before, 4), "after": round(after, 4),
                   "per_task_after": {t: round(v, 4) for t, v in sorted(after_tasks.items())},
                   "train_s": round(train_time, 1), "tokens_per_s": round(tokens / train_time)},
    }
    print("recipe = " + json.dumps(recipe, indent=2))
    return recipe


if __name__ == "__main__":
    main()
