"""Model FLOPs utilisation of the packed recipe on one GPU: a ~1B LLaMA, bf16, packed rows.

The trainer's own pieces do the work: ``collate_packed`` builds the rows (positions restart per
sample, ``cu_seq_lens``), ``attention_implementation(pack=True)`` picks the attention the trainer
would (flash-attention varlen when ``flash_attn`` is installed, else the per-sample SDPA of
``model/attention.py``) and ``sft_ce_sum`` is the loss (LM head on scored positions only).
Samples are random token ids with dolly-like lengths (``bench/throughput.py``'s records: mostly
short, a long tail, cut at 1024 tokens; the prompt is not scored). One process, no DeepSpeed: on
one GPU ZeRO has nothing to shard, and this measures how well the packed step uses the chip.

    python bench/mfu.py                          # 1.06B LLaMA, rows of 16384 tokens
    python bench/mfu.py --row_tokens 8192 --steps 10

Model FLOPs per step, counted for what the step computes (fwd + bwd = 3x forward):
``6 * N_body * tokens`` (N_body: the decoder layers' parameters), ``+ 6 * layers * hidden * L**2``
per sample of L tokens (causal attention, QK^T and AV), ``+ 6 * hidden * vocab * scored`` (the LM
head runs on scored positions only). MFU divides by the GPU's dense bf16 peak (``--peak_tflops``,
989 for an H100 SXM). Last line, JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import dolly_like_records
from transformers import LlamaConfig, LlamaForCausalLM

from model.attention import attention_implementation, segment_attention, torch_varlen_attn, varlen_attention
from openalpaca.loss import sft_ce_sum
from openalpaca.packing import collate_packed, model_inputs
from openalpaca.prompts import BOS_ID, EOS_ID, IGNORE_INDEX, EncodedSample

TOKENS_PER_WORD = 1.3  # LLaMA's sentencepiece on English prose, roughly
TEMPLATE_TOKENS = 20  # "### Input:\n ... ### Instruction:\n ... ### Response:" and the special ids


def random_samples(n: int, vocab: int, max_length: int, seed: int) -> list[EncodedSample]:
    """``n`` samples of random ids in the training layout, with dolly-like prompt and response lengths."""
    rng = random.Random(seed)
    samples = []
    for record in dolly_like_records(n, seed):
        words = {key: len(text.split()) for key, text in record.items()}
        prompt = TEMPLATE_TOKENS + math.ceil(TOKENS_PER_WORD * (words["instruction"] + words["input"]))
        prompt = min(prompt, max_length - 2)
        response = min(math.ceil(TOKENS_PER_WORD * words["output"]) + 1, max_length - prompt)
        ids = [BOS_ID] + [rng.randrange(3, vocab) for _ in range(prompt + response - 2)] + [EOS_ID]
        samples.append(EncodedSample(ids, [IGNORE_INDEX] * prompt + ids[prompt:], False))
    return samples


def rows(samples: list[EncodedSample], row_tokens: int) -> list[list[EncodedSample]]:
    """Samples in order, cut into rows of at most ``row_tokens`` tokens."""
    out, row, used = [], [], 0
    for s in samples:
        if used + len(s.input_ids) > row_tokens and row:
            out.append(row)
            row, used = [], 0
        row.append(s)
        used += len(s.input_ids)
    return out


def step_flops(row: list[EncodedSample], config: LlamaConfig, n_body: int) -> float:
    tokens = sum(len(s.input_ids) for s in row)
    scored = sum(sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in row)
    attention = sum(6 * config.num_hidden_layers * config.hidden_size * len(s.input_ids) ** 2 for s in row)
    return 6 * n_body * tokens + attention + 6 * config.hidden_size * config.vocab_size * scored


def check_attention(device: torch.device) -> None:
    """torch's varlen kernel against per-sample SDPA on one random packed bf16 row: outputs and gradients."""
    kernel = torch_varlen_attn()
    if kernel is None:
        print("attention check: torch's varlen kernel is not available here; per-sample SDPA is used")
        return
    gen = torch.Generator(device=device).manual_seed(0)
    lengths = [1, 7, 64, 200, 513, 1024, 300]
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    shape = (1, 16, sum(lengths), 128)

    def out_and_grads(attend) -> list[torch.Tensor]:
        qkv = [torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen.manual_seed(i)).requires_grad_()
               for i in range(3)]
        out = attend(*qkv)
        out.float().square().sum().backward()
        return [out.detach().float()] + [t.grad.float() for t in qkv]

    varlen = out_and_grads(lambda q, k, v: varlen_attention(kernel, q, k, v, cu))
    segments = out_and_grads(lambda q, k, v: segment_attention(q, k, v, cu.tolist()))
    diffs = [float((a - b).abs().max()) for a, b in zip(varlen, segments, strict=True)]
    print(f"attention check (bf16, samples of {lengths} tokens): varlen vs per-sample SDPA, max |diff| "
          f"out {diffs[0]:.2e}, grad q/k/v {diffs[1]:.2e}/{diffs[2]:.2e}/{diffs[3]:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--row_tokens", type=int, default=16384, help="token budget of a packed row (one per step)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--params", choices=("fp32", "bf16"), default="fp32",
                   help="fp32: fp32 weights under bf16 autocast; bf16: bf16 weights, as DeepSpeed's bf16 mode "
                        "runs forward and backward (its fp32 master copy lives in the optimizer, not timed here)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="", help="override the trainer's choice, e.g. sdpa (rows as one "
                   "sequence: wrong for packing, a speed reference only)")
    p.add_argument("--compile", action="store_true", help="torch.compile each layer's MLP and RMSNorms (dynamic "
                   "lengths); attention stays eager")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops over 2 steps")
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test the script with a tiny shape")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/mfu.py measures a GPU; none is visible")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if device.type == "cuda":
        check_attention(device)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=1024, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=0, tie_word_embeddings=False, use_cache=False)
    attention = args.attention or attention_implementation(pack=True)
    with device:
        model = LlamaForCausalLM._from_config(config, attn_implementation=attention,
                                              dtype=torch.bfloat16 if args.params == "bf16" else torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.compile:
        for layer in model.model.layers:
            for module in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
                module.compile(dynamic=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_body = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.001, fused=True)

    need = args.warmup + args.steps
    samples = random_samples(need * args.row_tokens // 100 + 64, args.vocab, 1024, args.seed)
    plan = rows(samples, args.row_tokens)[:need]
    if len(plan) < need:
        sys.exit(f"only {len(plan)} rows of data for {need} steps")
    batches = [collate_packed(row) for row in plan]

    def step(batch: dict) -> float:
        labels = batch["labels"].to(device)
        n = int((labels != IGNORE_INDEX).sum())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.params == "fp32"):
            loss = sft_ce_sum(model, model_inputs(batch, device), labels) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for batch in batches[: args.warmup]:
        step(batch)
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            for batch in batches[args.warmup : args.warmup + 2]:
                step(batch)
            sync()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    sync()
    start = time.perf_counter()
    losses = [step(batch) for batch in batches[args.warmup :]]
    sync()
    seconds = time.perf_counter() - start

    timed = plan[args.warmup :]
    tokens = sum(len(s.input_ids) for row in timed for s in row)
    flops = sum(step_flops(row, config, n_body) for row in timed)
    lengths = [len(s.input_ids) for row in timed for s in row]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "attention": attention,
        "params": n_params,
        "row_tokens": args.row_tokens,
        "gradient_checkpointing": args.gradient_checkpointing,
        "params_dtype": args.params,
        "compiled": args.compile,
        "samples_per_row": round(len(lengths) / len(timed), 1),
        "mean_sample_tokens": round(sum(lengths) / len(lengths), 1),
        "step_ms": round(1000 * seconds / len(timed), 1),
        "tokens_per_s": round(tokens / seconds),
        "model_tflops": round(flops / seconds / 1e12, 1),
        "mfu": round(flops / seconds / 1e12 / args.peak_tflops, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
