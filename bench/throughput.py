"""Supervised tokens per second: the seed's micro-batch 1 against padding-free packing, ZeRO-3 on 2 CPU ranks.

Usage (from anywhere; ~3-5 minutes on 2 cores)::

    .venv/bin/python bench/throughput.py [--samples 384] [--max_tokens 2048] [--repeats 1] [--work_dir DIR]
    .venv/bin/python bench/throughput.py --conversations      # multi-turn conversations instead of records

What runs: ``bash scripts/train_sft.sh --num_gpus 2`` (the DeepSpeed launcher, 2 CPU ranks,
``dsconfig/openllama.json``: ZeRO-3, AdamW), twice per repeat, on the same data, the same model
and the same config (``config/openllama.yaml``, 1 epoch, batch 64 samples per optimizer step,
max_length 1024, fp32, no gradient checkpointing); the runs differ only in

* seed: ``--pack false --micro_batch_size 1``, one sample per micro-step, as the seed trains;
* packed: ``--pack true --max_tokens_per_micro_batch MAX_TOKENS``.

Model: a random-init LLaMA, hidden 256, 4 layers, 8 heads, MLP 1024, vocabulary from a
sentencepiece BPE tokenizer trained on the data (~2 k pieces): ~5 M parameters (printed).
Data: Alpaca records generated here, with dolly-15k's shape: an instruction, a context in about a
third of the records, a response; lognormal lengths give many short samples and a long tail,
truncated at 1024 tokens (statistics printed). Each rank runs one thread (``OMP_NUM_THREADS=1``:
two ranks on two cores), in both modes.

Numbers come from the summary the trainer writes at the end, ``SAVE_PATH/logs/summary.json``:
``train_seconds`` is the wall time of the training loop (no start-up, no final checkpoint).
Tokens per second are ``supervised_tokens`` over it; padding_fraction is ``padding_tokens /
tokens_processed`` of the packed run; micro-steps are per rank for the one epoch. Both modes run
the fast recipe's data order and loss (``--epoch_tail pad --loss_weighting token``), so they
train the same samples in every step.
With ``--conversations`` every sample is a conversation (OpenAI ``messages`` records, read by the
trainer as such): 1 to 4 exchanges (40/30/20/10%), each a shorter dolly-like exchange (instruction
median 12 words, a context of median 60 in 35% of them, an answer of median 40), so sample lengths
spread wider than single records'; every answer is supervised.
With ``--repeats N`` the modes alternate and each mode's median is reported. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "intermediate_size": 1024}
MODES = {
    "seed": ["--pack", "false", "--micro_batch_size", "1"],
    "packed": ["--pack", "true"],
}


def pseudo_words(rng: random.Random, n: int = 800) -> list[str]:
    """Distinct made-up words (so no real text is copied), 2 to 4 syllables each."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def dolly_like_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records whose lengths follow dolly-15k's shape: mostly short, a long tail.

    Word counts are lognormal (median instruction 12 words, response 55, context 90 in 35% of
    the records, like dolly's closed QA, extraction and summarisation categories).
    """
    rng = random.Random(seed)
    words = pseudo_words(rng)

    def text(median: float, sigma: float) -> str:
        count = max(1, int(rng.lognormvariate(math.log(median), sigma)))
        return " ".join(rng.choice(words) for _ in range(count))

    return [
        {"instruction": text(12, 0.5), "input": text(90, 0.9) if rng.random() < 0.35 else "", "output": text(55, 1.0)}
        for _ in range(n)
    ]


def conversation_records(n: int, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """OpenAI ``messages`` records of 1 to 4 exchanges (40/30/20/10%), each a shorter dolly-like one."""
    rng = random.Random(seed)
    words = pseudo_words(rng)

    def text(median: float, sigma: float) -> str:
        count = max(1, int(rng.lognormvariate(math.log(median), sigma)))
        return " ".join(rng.choice(words) for _ in range(count))

    records = []
    for _ in range(n):
        messages = []
        for _ in range(rng.choices([1, 2, 3, 4], weights=[4, 3, 2, 1])[0]):
            question = text(12, 0.5) + (f" ### Input: {text(60, 0.9)}" if rng.random() < 0.35 else "")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": text(40, 1.0)}]
        records.append({"messages": messages})
    return records


def build(work: Path, samples: int, conversations: bool = False) -> tuple[Path, Path, int, list[int]]:
    """Write the data, the tokenizer and the model; returns their paths, parameter count, token lengths."""
    from transformers import LlamaForCausalLM

    from demo.tiny import llama_config, tokenizer_vocab_size, train_tokenizer, write_tiny_llama
    from model.llama import load_tokenizer
    from openalpaca.data import SFTDataset, read_training_data

    records = conversation_records(samples) if conversations else dolly_like_records(samples)
    data = work / "data.json"
    data.write_text(json.dumps(records))
    model = work / "model"
    texts = ([" ".join(m["content"] for m in r["messages"]) for r in records] if conversations
             else [" ".join(r.values()) for r in records])
    train_tokenizer(texts, model, vocab_size=2048)
    config = llama_config(tokenizer_vocab_size(model), max_position_embeddings=1024, **SHAPE)
    write_tiny_llama(model, config)
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    dataset = SFTDataset.from_records(read_training_data(data), load_tokenizer(model), 1024)
    return data, model, params, dataset.lengths


def train(mode: str, data: Path, model: Path, save: Path, max_tokens: int) -> dict[str, float]:
    """One launcher run; the trainer's logs/summary.json as numbers."""
    args = ["--model_path", str(model), "--data_path", str(data), "--save_path", str(save), "--epochs", "1",
            "--batch_size", "64", "--max_length", "1024", "--dtype", "fp32", "--gradient_checkpointing", "false",
            "--lr", "1e-3", "--warmup_steps", "1", "--logging_steps", "1000", "--eval_ratio", "0",
            "--epoch_tail", "pad", "--loss_weighting", "token", *MODES[mode]]
    if mode == "packed":
        args += ["--max_tokens_per_micro_batch", str(max_tokens)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", "scripts/train_sft.sh", "--num_gpus", "2", *args], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True)
    summary = save / "logs" / "summary.json"
    if proc.returncode != 0 or not summary.is_file():
        sys.exit(f"{mode} run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    found = json.loads(summary.read_text())
    return {"micro": found["micro_steps_per_rank"], "tokens": found["tokens_processed"],
            "padding": found["padding_tokens"], "supervised": found["supervised_tokens"],
            "seconds": found["train_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=384, help="records generated (6 optimizer steps of 64 at 384)")
    parser.add_argument("--max_tokens", type=int, default=2048, help="packed mode's max_tokens_per_micro_batch")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating; medians are reported")
    parser.add_argument("--work_dir", default="", help="keep data, model and checkpoints here (default: a temp dir)")
    parser.add_argument("--conversations", action="store_true",
                        help="multi-turn conversations (1 to 4 exchanges) instead of single records")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, model, params, lengths = build(work, args.samples, args.conversations)
        ordered = sorted(lengths)
        print(f"model: LLaMA hidden {SHAPE['hidden_size']}, {SHAPE['num_layers']} layers, {SHAPE['num_heads']} heads, "
              f"MLP {SHAPE['intermediate_size']}, {params / 1e6:.2f} M parameters; ZeRO-3, 2 CPU ranks, 1 thread each")
        kind = "conversations" if args.conversations else "records"
        print(f"data: {len(lengths)} {kind}, tokens mean {statistics.mean(lengths):.0f}, median "
              f"{statistics.median(lengths):.0f}, p90 {ordered[int(0.9 * len(ordered))]}, max {ordered[-1]} "
              f"({sum(n == 1024 for n in lengths)} at max_length 1024)")
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
        runs: dict[str, list[dict[str, float]]] = {"seed": [], "packed": []}
        for r in range(args.repeats):
            for mode in ("seed", "packed") if r % 2 == 0 else ("packed", "seed"):
                start = time.time()
                result = train(mode, data, model, work / f"{mode}{r}", args.max_tokens)
                result["tok_s"] = result["supervised"] / result["seconds"]
                runs[mode].append(result)
                print(f"{mode:>6}: {result['micro']:.0f} micro-steps/rank, {result['tokens']:.0f} tokens "
                      f"({result['padding']:.0f} padding), {result['supervised']:.0f} supervised in "
                      f"{result['seconds']:.1f}s = {result['tok_s']:.0f} tok/s "
                      f"(launch to exit {time.time() - start:.0f}s, load {os.getloadavg()[0]:.2f})")

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    seed_tok_s, packed_tok_s = med("seed", "tok_s"), med("packed", "tok_s")
    packed = runs["packed"][0]
    print(json.dumps({
        "data": "conversations" if args.conversations else "records",
        "seed_tokens_per_s": round(seed_tok_s, 1),
        "packed_tokens_per_s": round(packed_tok_s, 1),
        "speedup": round(packed_tok_s / seed_tok_s, 3),
        "padding_fraction": round(packed["padding"] / packed["tokens"], 5),
        "seed_microsteps": int(med("seed", "micro")),
        "packed_microsteps": int(med("packed", "micro")),
        "microsteps_ratio": round(med("seed", "micro") / med("packed", "micro"), 2),
        "model_params": params,
        "max_tokens_per_micro_batch": args.max_tokens,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
