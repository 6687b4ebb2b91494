"""The same fine-tune through this project's trainer and TRL's SFTTrainer: speed, memory and what each learns.

Usage (from the repository root after the README's set-up, which installs the pinned TRL;
several minutes a repeat on 2 idle cores, three start-ups and three trainings, far more on a loaded
machine)::

    .venv/bin/python bench/peers.py [--steps 6] [--repeats 3] [--work_dir DIR]
    .venv/bin/python bench/peers.py --conversations      # multi-turn conversations, every answer supervised

Three trainers, the same job: a random-init LLaMA (bench/throughput.py's: hidden 256, 4 layers,
8 heads, MLP 1024, its own ~2 k-piece sentencepiece BPE vocabulary), ``steps x batch_size``
dolly-like Alpaca records (bench/throughput.py's generator; records longer than ``max_length``
are left out, so no recipe truncates), one epoch, global batch 64 samples, lr 1e-3 with
DeepSpeed's WarmupDecayLR (linear warmup of ``--warmup_steps``, then linear decay to 0),
AdamW (0.9/0.95, weight decay 0.001), clipping 1.0, fp32 on CPU (bf16 on a GPU), no gradient
checkpointing, DeepSpeed ZeRO-3 with ``dsconfig/openllama.json``'s settings on 2 ranks (CPU:
gloo, one thread per rank; GPU: one rank per GPU):

* ``fast``: ``scripts/train_sft.sh --config config/openllama_fast.yaml`` (clean layout, loss per
  supervised token, padding-free packing in rows of ``--max_tokens`` tokens);
* ``original``: ``scripts/train_sft.sh --config config/openllama.yaml`` (the original's tensors:
  one sample per micro-batch, per-sample loss), with the same linear warmup as the others;
* ``trl``: TRL's ``SFTTrainer`` (bench/peers_trl.py, under torchrun) with padding-free batches and
  loss on completions only, fed the fast recipe's very ids (``openalpaca.prompts``: the same
  prompt text, tokens and supervised positions; checked here before it starts), the same
  DeepSpeed JSON with every value filled (the Trainer's accelerate integration checks it agrees
  with its arguments). Its micro-batch is the largest divisor of ``batch_size / ranks`` whose mean
  token count stays within ``--max_tokens``, the fast recipe's row budget (``--trl_micro_batch``
  sets it); attention is SDPA (flash-attention 2 on a GPU where ``flash_attn`` is installed).

The modes alternate over ``--repeats`` (forward order, then reversed) and medians are reported.
Figures: supervised tokens/s (supervised tokens over the training loop's wall time, start-up and
saving excluded; the project's trainer reports both in ``logs/summary.json``, TRL's run writes
the same file), seconds per optimizer step, peak memory per rank (the largest rank's resident set
on CPU, allocated memory on a GPU), the final training loss each trainer reports (the original
recipe's has other targets), and the held-out loss: the saved weights of every run, loaded with
plain transformers, scored by one function on the same held-out records and the same supervised
tokens (each record's response and its eos after the prompt its layout's inference feeds).
Ratios against TRL are medians of each repeat's ratio. The last line is JSON.

``--conversations``: the samples are bench/throughput.py's conversations (1 to 4 exchanges, OpenAI
``messages`` records, read by the project's trainer as such). TRL gets the fast recipe's ids of
each conversation with a completion mask over every answer: the tokens TRL's assistant-only loss
trains (its ``assistant_only_loss`` needs generation markers in a chat template; the recipe keeps
one template, and pre-tokenized rows give TRL exactly the supervised positions). The held-out loss
scores every answer of each held-out conversation, after the earlier turns, as inference feeds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODES = ("fast", "original", "trl")
RECIPES = {"fast": "config/openllama_fast.yaml", "original": "config/openllama.yaml"}
DS_CONFIG = "dsconfig/openllama.json"


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpus = _gpu_count()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6,
                        help="optimizer steps (one epoch of steps x batch_size records)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating; medians are reported")
    parser.add_argument("--batch_size", type=int, default=64, help="samples per optimizer step over all ranks")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate (a random-init model needs a large one)")
    parser.add_argument("--warmup_steps", type=int, default=1, help="linear warmup steps, then linear decay to 0")
    parser.add_argument("--max_length", type=int, default=1024, help="longest sample; longer records are left out")
    parser.add_argument("--max_tokens", type=int, default=2048, help="the fast recipe's max_tokens_per_micro_batch")
    parser.add_argument("--trl_micro_batch", type=int, default=0,
                        help="TRL's per_device_train_batch_size (0: the largest fitting --max_tokens on average)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out records scored after training")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--intermediate_size", type=int, default=1024)
    parser.add_argument("--vocab_size", type=int, default=2048, help="upper bound of the tokenizer's pieces")
    parser.add_argument("--ranks", type=int, default=gpus or 2,
                        help="ZeRO-3 ranks (default: the GPUs, else 2 CPU ranks)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if gpus else "fp32",
                        help="training precision (default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--work_dir", default="", help="keep data, models and checkpoints here (default: a temp dir)")
    parser.add_argument("--conversations", action="store_true",
                        help="multi-turn conversations (1 to 4 exchanges) instead of single records")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    problems = [f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})" for m in modes if m not in MODES]
    if args.steps < 1 or args.repeats < 1:
        problems.append("--steps and --repeats must be at least 1")
    if args.batch_size % args.ranks:
        problems.append(f"--batch_size {args.batch_size} is not divisible by --ranks {args.ranks}")
    if problems:
        parser.error("; ".join(problems))
    args.modes = modes
    return args


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---------------------------------------------------------------------------- the job


def generated(count: int, conversations: bool, seed: int = 0) -> list[dict]:
    from throughput import conversation_records, dolly_like_records

    return conversation_records(count, seed) if conversations else dolly_like_records(count, seed)


def exchanges(record: dict) -> tuple:
    """A generated record (Alpaca or ``messages``) as the conversation the trainer reads it as."""
    from openalpaca.conversations import parse_conversations

    return parse_conversations([("generated record", record)])[1][0]


def fitting_records(count: int, max_length: int, tokenizer, seed: int = 0, conversations: bool = False) -> list[dict]:
    """``count`` generated records whose clean sample fits ``max_length`` (no recipe truncates, so
    every recipe trains the same records whole)."""
    from openalpaca.prompts import SampleFormat, encode_conversation

    fmt = SampleFormat("clean", "keep_prompt", False)
    kept: list[dict] = []
    for rec in generated(2 * count + 64, conversations, seed):
        # The original layout adds two tokens per exchange; leave room so it too fits whole.
        conversation = exchanges(rec)
        sample = encode_conversation(tokenizer, conversation, max_length - 2 * len(conversation), fmt)
        if sample is not None and not sample.truncated:
            kept.append(rec)
        if len(kept) == count:
            return kept
    raise SystemExit(f"error: only {len(kept)} of {count} generated records fit max_length {max_length}")


def build(work: Path, args: argparse.Namespace) -> dict:
    """Tokenizer, model, training data, held-out records and TRL's pre-tokenized rows, in ``work``."""
    from transformers import LlamaForCausalLM

    from demo.tiny import llama_config, tokenizer_vocab_size, train_tokenizer, write_tiny_llama
    from model.hf_tokenizer import write_hf_tokenizer
    from model.llama import load_tokenizer

    n_train = args.steps * args.batch_size
    model = work / "model"
    # The tokenizer sees the generator's vocabulary (its pseudo-words), never the held-out records.
    texts = [" ".join(ex.instruction + " " + ex.input + " " + ex.output for ex in exchanges(r))
             for r in generated(n_train, args.conversations)]
    train_tokenizer(texts, model, vocab_size=args.vocab_size)
    write_hf_tokenizer(model, "clean")  # AutoTokenizer (TRL's processing_class) gives sentencepiece's ids
    config = llama_config(tokenizer_vocab_size(model), hidden_size=args.hidden_size, num_layers=args.num_layers,
                          num_heads=args.num_heads, intermediate_size=args.intermediate_size,
                          max_position_embeddings=args.max_length)
    write_tiny_llama(model, config)
    tokenizer = load_tokenizer(model)
    records = fitting_records(n_train + args.heldout, args.max_length, tokenizer, conversations=args.conversations)
    train, heldout = records[:n_train], records[n_train:]
    data = work / "data.json"
    data.write_text(json.dumps(train))
    rows = trl_rows(train, tokenizer, args.max_length)
    trl_data = work / "trl_data.jsonl"
    trl_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return {"model": model, "data": data, "trl_data": trl_data, "rows": rows, "heldout": heldout,
            "tokenizer": tokenizer, "params": params}


def trl_rows(records: list[dict], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """TRL's pre-tokenized samples: the fast recipe's ids (its SFTDataset) as ``input_ids`` and
    ``completion_mask`` (for a conversation, over every answer), checked to give back exactly its
    labels by TRL's rule (id where the mask is 1, else -100)."""
    from openalpaca.data import SFTDataset
    from openalpaca.prompts import IGNORE_INDEX, SampleFormat

    dataset = SFTDataset.from_records([exchanges(r) for r in records], tokenizer, max_length,
                                      SampleFormat("clean", "keep_prompt", False))
    if len(dataset) != len(records):
        raise SystemExit(f"error: {len(records) - len(dataset)} records do not fit max_length {max_length}")
    rows = []
    for sample in dataset.samples:
        mask = [int(label != IGNORE_INDEX) for label in sample.labels]
        trl_labels = [i if m else IGNORE_INDEX for i, m in zip(sample.input_ids, mask, strict=True)]
        if trl_labels != sample.labels:
            raise SystemExit("error: TRL's labels would differ from the fast recipe's")
        rows.append({"input_ids": sample.input_ids, "completion_mask": mask})
    return rows


def trl_micro_batch(rows: list[dict], per_rank: int, max_tokens: int) -> int:
    """The largest divisor of ``per_rank`` whose mean token count fits ``max_tokens`` (at least 1)."""
    mean = statistics.mean(len(r["input_ids"]) for r in rows)
    fitting = [b for b in range(1, per_rank + 1) if per_rank % b == 0 and b * mean <= max_tokens]
    return max(fitting, default=1)


def trl_ds_config(args: argparse.Namespace, micro: int) -> dict:
    """dsconfig/openllama.json resolved as the project's trainer resolves it for the fast recipe,
    with TRL's micro-batch and accumulation (its micro-batches are samples, not packed rows)."""
    from openalpaca.config import load_config, load_ds_config, resolve_ds_config

    cfg = load_config(["--config", RECIPES["fast"], *common_flags(args)])
    ds = resolve_ds_config(load_ds_config(REPO / DS_CONFIG), cfg, args.ranks, args.steps, path=DS_CONFIG)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = args.batch_size // (args.ranks * micro)
    return ds


def common_flags(args: argparse.Namespace) -> list[str]:
    """What every run shares (train_sft.py flags; TRL's run gets the same values)."""
    return ["--epochs", "1", "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
            "--dtype", args.dtype, "--gradient_checkpointing", "false", "--lr", str(args.lr),
            "--warmup_steps", str(args.warmup_steps), "--warmup_ratio", "0", "--warmup_type", "linear",
            "--logging_steps", "1000", "--eval_ratio", "0", "--seed", "0"]


# ---------------------------------------------------------------------------- runs


def rank_env(args: argparse.Namespace, memory_dir: Path) -> dict[str, str]:
    # TRAIN_ENTRY: scripts/train_sft.sh runs train_sft.py through the wrapper that records peak memory.
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1", "PEERS_MEMORY_DIR": str(memory_dir),
           "TRAIN_ENTRY": "bench/peers_ours.py", "TOKENIZERS_PARALLELISM": "false"}
    if not on_gpu():
        # The ranks share the cores, one thread each at 2 ranks on 2 cores: the same for every mode.
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.ranks)))
    return env


def command(mode: str, args: argparse.Namespace, job: dict, save: Path) -> list[str]:
    if mode == "trl":
        spec = save / "job.json"
        spec.write_text(json.dumps({
            "model_path": str(job["model"]), "data": str(job["trl_data"]), "out_dir": str(save),
            "ds_config": job["trl_ds_config"], "per_device_batch": job["trl_micro"],
            "accumulation": job["trl_ds_config"]["gradient_accumulation_steps"], "lr": args.lr,
            "weight_decay": job["trl_ds_config"]["optimizer"]["params"]["weight_decay"],
            "clipping": job["trl_ds_config"]["gradient_clipping"], "warmup_steps": args.warmup_steps, "seed": 0,
            "dtype": args.dtype, "attn_implementation": trl_attention()}))
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
                str(REPO / "bench" / "peers_trl.py"), str(spec)]
    flags = ["--config", RECIPES[mode], *common_flags(args), "--model_path", str(job["model"]),
             "--data_path", str(job["data"]), "--save_path", str(save)]
    if mode == "fast":
        flags += ["--max_tokens_per_micro_batch", str(args.max_tokens)]
    return ["bash", "scripts/train_sft.sh", "--num_gpus", str(args.ranks), *flags]


def trl_attention() -> str:
    """What TRL's documentation advises for padding-free batches: flash-attention 2 where it runs, else SDPA."""
    import importlib.util

    return "flash_attention_2" if on_gpu() and importlib.util.find_spec("flash_attn") else "sdpa"


def train(mode: str, args: argparse.Namespace, job: dict, save: Path) -> dict:
    """One run; its figures from ``save/logs/summary.json``, the ranks' memory files and the held-out loss."""
    shutil.rmtree(save, ignore_errors=True)
    memory = save / "memory"
    memory.mkdir(parents=True)
    proc = subprocess.run(command(mode, args, job, save), check=False, cwd=REPO, env=rank_env(args, memory),
                          capture_output=True, text=True)
    summary = save / "logs" / "summary.json"
    if proc.returncode != 0 or not summary.is_file():
        sys.exit(f"error: the {mode} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    found = json.loads(summary.read_text())
    peaks = [json.loads(p.read_text())["peak_mib"] for p in sorted(memory.glob("rank*.json"))]
    if len(peaks) != args.ranks:
        sys.exit(f"error: the {mode} run left {len(peaks)} of {args.ranks} ranks' memory files in {memory}")
    weights = Path(found["checkpoint"]) if mode == "trl" else export_ours(save)
    layout = "original" if mode == "original" else "clean"
    return {"steps": found["steps"], "supervised": found["supervised_tokens"], "seconds": found["train_seconds"],
            "final_loss": found["final_loss"], "peak_mib": max(peaks),
            "heldout_loss": heldout_loss(weights, layout, job["heldout"], job["tokenizer"])}


def export_ours(save: Path) -> Path:
    """The project's checkpoint as an HF folder (the project's own exporter, fp32)."""
    from contextlib import redirect_stdout
    from io import StringIO

    from model.export import export

    with redirect_stdout(StringIO()):
        return export(save, save / "hf", dtype="fp32")


# ---------------------------------------------------------------------------- evaluation


def heldout_loss(folder: Path, layout: str, records: list[dict], tokenizer) -> float:
    """Mean cross-entropy per supervised token of the held-out records, one way for every run.

    The weights are loaded with plain transformers (fp32, SDPA, every token attended, as
    inference runs). Each answer is scored on the same tokens, its ids and the eos, after the
    prompt its model's layout feeds at inference (``openalpaca.prompts.prompt_ids``, a
    conversation's earlier exchanges first; the original layout's answer then starts with a bos,
    given to it as context). A conversation is one forward pass over its ids
    (``conversation_ids``), whose prefix before each answer is that prompt.
    """
    import torch
    from transformers import LlamaForCausalLM

    from openalpaca.prompts import conversation_ids

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    ce, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            built = conversation_ids(tokenizer, exchanges(rec), layout)
            ids = torch.tensor([built.input_ids])
            logits = model(input_ids=ids).logits[0].float()
            for span in built.spans:
                first = span.answer_start + (1 if layout == "original" else 0)  # the answer's own bos is context
                target = ids[0, first:span.end]
                ce += torch.nn.functional.cross_entropy(logits[first - 1:span.end - 1], target,
                                                        reduction="sum").item()
                count += len(target)
    return ce / count


# ---------------------------------------------------------------------------- report


def describe(mode: str, run: dict) -> str:
    return (f"{mode:>8}: {run['steps']} steps, {run['supervised']:.0f} supervised tokens in {run['seconds']:.1f}s = "
            f"{run['tok_s']:.0f} tok/s, {run['step_s']:.2f} s/step, peak {run['peak_mib']:.0f} MiB/rank, "
            f"final loss {run['final_loss']:.4f}, held-out loss {run['heldout_loss']:.4f}")


def report(runs: dict[str, list[dict]], args: argparse.Namespace, job: dict) -> dict:
    """Medians per mode, and each mode's ratios against TRL in the same repeat."""
    import trl

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    keys = {"tokens_per_s": ("tok_s", 1), "seconds_per_step": ("step_s", 3), "peak_mib_per_rank": ("peak_mib", 0),
            "final_train_loss": ("final_loss", 4), "heldout_loss": ("heldout_loss", 4)}
    out: dict = {}
    for mode in runs:
        out[mode] = {name: round(med(mode, key), digits) for name, (key, digits) in keys.items()}
        out[mode]["supervised_tokens"] = int(med(mode, "supervised"))
    if "trl" in runs:
        for mode in (m for m in runs if m != "trl"):
            paired = list(zip(runs[mode], runs["trl"], strict=True))
            out[f"{mode}_vs_trl_tokens_per_s"] = round(statistics.median(a["tok_s"] / b["tok_s"] for a, b in paired), 3)
            out[f"{mode}_minus_trl_heldout_loss"] = round(
                statistics.median(a["heldout_loss"] - b["heldout_loss"] for a, b in paired), 4)
    out["data"] = "conversations" if args.conversations else "records"
    out.update({"steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size, "ranks": args.ranks,
                "dtype": args.dtype, "device": "cuda" if on_gpu() else "cpu", "model_params": job["params"],
                "max_tokens_per_micro_batch": args.max_tokens, "trl_micro_batch": job["trl_micro"],
                "trl_version": trl.__version__, "load_avg_1m": round(os.getloadavg()[0], 2)})
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        job = build(work, args)
        per_rank = args.batch_size // args.ranks
        job["trl_micro"] = args.trl_micro_batch or trl_micro_batch(job["rows"], per_rank, args.max_tokens)
        if per_rank % job["trl_micro"]:
            sys.exit(f"error: --trl_micro_batch {job['trl_micro']} does not divide {per_rank} samples per rank")
        job["trl_ds_config"] = trl_ds_config(args, job["trl_micro"])
        lengths = [len(r["input_ids"]) for r in job["rows"]]
        print(f"model: {job['params'] / 1e6:.2f} M parameters; {len(lengths)} samples "
              f"(mean {statistics.mean(lengths):.0f} "
              f"tokens, max {max(lengths)}), {len(job['heldout'])} held out; ZeRO-3 on {args.ranks} "
              f"{'GPU' if on_gpu() else 'CPU'} ranks, {args.dtype}; TRL micro-batch {job['trl_micro']} x "
              f"{job['trl_ds_config']['gradient_accumulation_steps']} accumulation; load {os.getloadavg()[0]:.2f}",
              flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in args.modes}
        for r in range(args.repeats):
            for mode in args.modes if r % 2 == 0 else args.modes[::-1]:
                start = time.time()
                run = train(mode, args, job, work / f"{mode}{r}")
                run["tok_s"], run["step_s"] = run["supervised"] / run["seconds"], run["seconds"] / run["steps"]
                runs[mode].append(run)
                print(f"{describe(mode, run)} (launch to exit {time.time() - start:.0f}s, load "
                      f"{os.getloadavg()[0]:.2f})", flush=True)
        print(json.dumps(report(runs, args, job)))


if __name__ == "__main__":
    main()
