"""A cost model of OpenAlpaca's 7B fine-tune: the seed's ~30 minutes, and the packed recipe's.

Usage (CPU only, a few seconds)::

    .venv/bin/python bench/project_7b.py [--max_tokens 2048] [--samples 15011] [--mean_tokens 220]

The run: OpenLLaMA-7B (32 layers, hidden 4096, MLP 11008, vocabulary 32000: 6.74 B
parameters), dolly-15k (15011 samples, ~220 tokens each in the Alpaca layout), 2 epochs, 64
samples per optimizer step, ZeRO-3 over 8 GPUs in bf16, as ``config/openllama.yaml`` runs it.

Per micro-step, every GPU

* computes ``F`` FLOPs per token: ``6 N`` (forward and backward matmuls, ``N`` parameters),
  ``+ 2 N`` with gradient checkpointing (one more forward), plus causal attention
  ``6 L h n`` per token for a sample of ``n`` tokens (``8 L h n`` with checkpointing), at
  ``peak * eta(m)``, where ``eta(m) = eta_max * m / (m + m_half)`` is the matmul efficiency of a
  micro-batch of ``m`` tokens (one 220-token sample keeps a GPU far below its peak);
* all-gathers the bf16 weights twice (forward, backward) and reduce-scatters the bf16
  gradients once: ``3 * 2 N * (W - 1) / W`` bytes through each GPU at ``bus_bw``, the
  bandwidth ZeRO-3's bucketed collectives reach, overlapped with compute by its prefetch and
  ``overlap_comm``, so the micro-step takes ``max(compute, comm)``;
* pays a fixed ``t_fixed`` of ZeRO-3 bookkeeping (hooks that fetch and release each
  sub-module's partitions, host-side launches) however few tokens it holds.

Each optimizer step adds an AdamW update of ``N / W`` fp32 parameters (memory-bound). Start-up
(loading 13.5 GB of weights, building the engine) is left out of every column.

``bus_bw`` and ``t_fixed`` are not on a data sheet: they are fitted so that the seed's
micro-batch-1 run comes out at its ~30 minutes, then kept for the packed recipe, whose
micro-steps come from the real planner (``openalpaca.packing``) on dolly-like lengths (many
short samples, a long tail to 1024 tokens). Only their sum per micro-step is pinned by the
seed's 30 minutes; the last table shows the packed projection when the split between them moves.
H100 keeps the A100 fit scaled by the hardware: ``bus_bw`` by the NVLink ratio, ``t_fixed`` as is
(host-bound). Output is markdown, for the README.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openalpaca.data import PAD_SLOT, step_slots, total_steps
from openalpaca.packing import pack_step

LAYERS, HIDDEN, MLP, VOCAB = 32, 4096, 11008, 32000
PARAMS = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN) + 2 * VOCAB * HIDDEN + HIDDEN
GPUS, BATCH, EPOCHS, MAX_LENGTH = 8, 64, 2, 1024
SEED_MINUTES = 30.0  # the seed's reported wall time on 8 x A100-40GB


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 tensor-core peak, per GPU
    nvlink_bw: float  # NVLink bytes/s per direction, per GPU
    hbm_bw: float  # bytes/s
    memory_gb: float
    eta_max: float = 0.65  # best matmul efficiency of a whole training step (norms, rope, CE included)
    m_half: float = 200.0  # micro-batch tokens at which that efficiency is halved
    bus_bw: float = 0.0  # ZeRO-3 collectives' bytes/s per GPU: fitted below
    t_fixed: float = 0.0  # seconds of ZeRO-3 bookkeeping per micro-step: fitted below

    def eta(self, tokens: float) -> float:
        return self.eta_max * tokens / (tokens + self.m_half)


A100 = Hardware("8xA100-40GB", peak_flops=312e12, nvlink_bw=300e9, hbm_bw=1.555e12, memory_gb=40)
H100 = Hardware("8xH100-80GB", peak_flops=989e12, nvlink_bw=450e9, hbm_bw=3.35e12, memory_gb=80)


@dataclass(frozen=True)
class Recipe:
    name: str
    pack: bool
    checkpointing: bool
    max_tokens: int = 0  # packed rows; 0 for the seed's one sample per micro-step


@dataclass
class MicroStep:
    tokens: int  # the fullest row of the micro-step, over all GPUs (they wait for it)
    square_tokens: int  # sum of n**2 over that row's samples (attention)


def dolly_like_lengths(n: int, mean: float, seed: int = 0) -> tuple[int, ...]:
    """Sample lengths in tokens: lognormal (sigma 0.83, dolly's spread) with the given mean, cut to 24..1024."""
    sigma = 0.83
    mu = math.log(mean) - sigma**2 / 2
    rng = random.Random(seed)
    return tuple(min(MAX_LENGTH, max(24, round(rng.lognormvariate(mu, sigma)))) for _ in range(n))


@functools.cache
def micro_steps(lengths: tuple[int, ...], recipe: Recipe) -> tuple[list[MicroStep], int]:
    """Every micro-step of the run (as every GPU runs them in lockstep), and the optimizer steps."""
    steps, out = 0, []
    tail = "pad" if recipe.pack else "carry"  # the fast recipe's epoch tail; the original's step count
    for step in range(total_steps(len(lengths), EPOCHS, BATCH, tail)):
        ids = [i for i in step_slots(len(lengths), step, 0, BATCH, tail) if i != PAD_SLOT]
        steps += 1
        if recipe.pack:
            rows = pack_step(ids, lengths, recipe.max_tokens, GPUS)
            laps = [rows[j : j + GPUS] for j in range(0, len(rows), GPUS)]
        else:
            ids += [None] * (BATCH - len(ids))
            laps = [[[i] if i is not None else [] for i in ids[j : j + GPUS]] for j in range(0, BATCH, GPUS)]
        for lap in laps:  # an empty row (a pad slot or pad micro-batch) still runs one token
            full = max(lap, key=lambda row: sum(lengths[i] for i in row))
            out.append(MicroStep(max(1, sum(lengths[i] for i in full)), sum(lengths[i] ** 2 for i in full)))
    return out, steps


def flops(ms: MicroStep, checkpointing: bool) -> float:
    passes = 4 if checkpointing else 3  # forward = 1, backward = 2, recomputed forward = 1
    return 2 * passes * PARAMS * ms.tokens + 2 * passes * LAYERS * HIDDEN * ms.square_tokens


def comm_seconds(hw: Hardware) -> float:
    return 3 * 2 * PARAMS * (GPUS - 1) / GPUS / hw.bus_bw


def optimizer_seconds(hw: Hardware) -> float:
    # fp32 master weight, grad, two moments read; weight and moments written; bf16 copy written;
    # DeepSpeed's torch AdamW (not fused) makes ~3 passes over them.
    return 3 * (PARAMS / GPUS) * (4 * 4 + 3 * 4 + 2) / hw.hbm_bw


@dataclass
class Projection:
    recipe: Recipe
    hw: Hardware
    micro_steps: int
    optimizer_steps: int
    mean_tokens: float
    compute: float
    comm: float
    total: float


def project(lengths: tuple[int, ...], recipe: Recipe, hw: Hardware) -> Projection:
    plan, steps = micro_steps(lengths, recipe)
    compute = [flops(ms, recipe.checkpointing) / (hw.peak_flops * hw.eta(ms.tokens)) for ms in plan]
    comm = comm_seconds(hw)
    total = sum(max(c, comm) + hw.t_fixed for c in compute) + steps * optimizer_seconds(hw)
    return Projection(recipe, hw, len(plan), steps, sum(ms.tokens for ms in plan) / len(plan),
                      sum(compute) / len(plan), comm, total)


def fit(lengths: tuple[int, ...], seed: Recipe, hw: Hardware, t_fixed: float) -> Hardware:
    """``hw`` with ``t_fixed`` and the ``bus_bw`` (bisection) that make the seed take SEED_MINUTES."""
    low, high = 1e9, 1e13  # the seed's time falls as the bandwidth grows
    if project(lengths, seed, replace(hw, bus_bw=high, t_fixed=t_fixed)).total > SEED_MINUTES * 60:
        raise ValueError(f"with {t_fixed * 1e3:.0f} ms fixed per micro-step the seed takes over {SEED_MINUTES} min")
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if project(lengths, seed, replace(hw, bus_bw=mid, t_fixed=t_fixed)).total > \
            SEED_MINUTES * 60 else (low, mid)
    return replace(hw, bus_bw=high, t_fixed=t_fixed)


def activation_gb(tokens: int, checkpointing: bool) -> float:
    """bf16 activations kept for backward: ~2 bytes x (7 h + 4 MLP) per token per layer, or one h
    per layer plus one layer's worth with checkpointing; logits in bf16 and fp32 with their grad."""
    per_layer = 2 * (7 * HIDDEN + 4 * MLP)
    kept = tokens * (LAYERS * 2 * HIDDEN + per_layer) if checkpointing else tokens * LAYERS * per_layer
    return (kept + tokens * VOCAB * 10) / 1e9


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_tokens", type=int, default=2048, help="packed recipe's max_tokens_per_micro_batch")
    parser.add_argument("--samples", type=int, default=15011, help="training samples (dolly-15k: 15011)")
    parser.add_argument("--mean_tokens", type=float, default=220, help="mean tokens per sample, prompt included")
    parser.add_argument("--fixed_ms", type=float, default=100,
                        help="fixed ZeRO-3 overhead per micro-step, ms (the bandwidth is then fitted to the seed)")
    args = parser.parse_args()

    lengths = dolly_like_lengths(args.samples, args.mean_tokens)
    seed = Recipe("original: micro-batch 1, no checkpointing", pack=False, checkpointing=False)
    packed = Recipe(f"packed {args.max_tokens}, no checkpointing", True, False, args.max_tokens)
    packed_ckpt = Recipe(f"packed {2 * args.max_tokens}, checkpointing", True, True, 2 * args.max_tokens)
    a100 = fit(lengths, seed, A100, args.fixed_ms / 1e3)
    h100 = replace(H100, bus_bw=a100.bus_bw * H100.nvlink_bw / A100.nvlink_bw, t_fixed=a100.t_fixed)
    rows = [project(lengths, r, hw) for hw in (a100, h100) for r in (seed, packed, packed_ckpt)]
    total_tokens = EPOCHS * sum(lengths)

    print(f"## 7B cost model (bench/project_7b.py)\n\nOpenLLaMA-7B ({PARAMS / 1e9:.2f} B parameters), "
          f"{args.samples} samples x {EPOCHS} epochs = {total_tokens / 1e6:.2f} M tokens (mean "
          f"{sum(lengths) / len(lengths):.0f}, max {max(lengths)}), {BATCH} samples per optimizer step, "
          f"ZeRO-3 bf16 on {GPUS} GPUs. 6 N FLOPs per token: {6 * PARAMS * total_tokens:.2e} FLOPs, "
          f"{6 * PARAMS * total_tokens / (GPUS * A100.peak_flops):.0f} s at 100% of 8 x 312 TFLOP/s.\n")
    print("| hardware | recipe | micro-steps per GPU | fullest row, tokens | compute per micro-step "
          "| ZeRO-3 comm per micro-step | fixed per micro-step | optimizer steps | projected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in rows:
        print(f"| {p.hw.name} | {p.recipe.name} | {p.micro_steps} | {p.mean_tokens:.0f} | {p.compute * 1e3:.0f} ms | "
              f"{p.comm * 1e3:.0f} ms | {p.hw.t_fixed * 1e3:.0f} ms | {p.optimizer_steps} | **{minutes(p.total)}** |")

    print("\n| assumption | 8xA100-40GB | 8xH100-80GB | source |")
    print("|---|---|---|---|")
    print(f"| bf16 dense peak per GPU | {A100.peak_flops / 1e12:.0f} TFLOP/s | {H100.peak_flops / 1e12:.0f} TFLOP/s "
          f"| data sheets |")
    print(f"| matmul efficiency eta(m) = eta_max m / (m + m_half) | eta_max {A100.eta_max}, m_half {A100.m_half:.0f}: "
          f"eta(220) = {A100.eta(220):.2f}, eta(1800) = {A100.eta(1800):.2f} | same | assumed: small GEMMs leave "
          f"SMs idle |")
    print(f"| NVLink per direction | {A100.nvlink_bw / 1e9:.0f} GB/s | {H100.nvlink_bw / 1e9:.0f} GB/s | data sheets |")
    print(f"| ZeRO-3 collective bandwidth (bus_bw) | {a100.bus_bw / 1e9:.0f} GB/s | {h100.bus_bw / 1e9:.0f} GB/s "
          f"| fitted to the seed's {SEED_MINUTES:.0f} min; H100 scaled by NVLink |")
    print(f"| fixed ZeRO-3 overhead per micro-step | {a100.t_fixed * 1e3:.0f} ms | {h100.t_fixed * 1e3:.0f} ms "
          f"| assumed (--fixed_ms): ZeRO-3 hooks over ~450 sub-modules x 3 passes; host-bound, same on H100 |")
    print(f"| bytes per micro-step through each GPU | {3 * 2 * PARAMS * (GPUS - 1) / GPUS / 1e9:.1f} GB | same "
          f"| 2 all-gathers + 1 reduce-scatter of {2 * PARAMS / 1e9:.1f} GB bf16, x (W-1)/W |")
    print(f"| AdamW step (N/W fp32, memory-bound, x3 unfused) | {optimizer_seconds(A100) * 1e3:.0f} ms | "
          f"{optimizer_seconds(H100) * 1e3:.0f} ms | HBM {A100.hbm_bw / 1e12:.2f} / {H100.hbm_bw / 1e12:.2f} TB/s |")
    states = 16 * PARAMS / GPUS / 1e9
    print(f"| memory at {args.max_tokens} tokens, no checkpointing | {states:.1f} GB states + "
          f"{activation_gb(args.max_tokens, False):.1f} GB activations of {A100.memory_gb:.0f} GB | same, of "
          f"{H100.memory_gb:.0f} GB | 16 bytes/param over {GPUS} GPUs; ~2 (7 h + 4 MLP) bytes/token/layer |")

    print("\nThe packed A100 projection as the assumed fixed overhead moves (bus_bw refitted each time, "
          "so the seed stays at 30 min):\n")
    fixed = (0, 50, 100, 150, 200)
    print("| fixed ms per micro-step | " + " | ".join(f"{ms} ms" for ms in fixed) + " |")
    print("|---|" + "---|" * len(fixed))
    cells = []
    for ms in fixed:
        hw = fit(lengths, seed, A100, ms / 1e3)
        cells.append(f"{minutes(project(lengths, packed, hw).total)} (bus_bw {hw.bus_bw / 1e9:.0f} GB/s)")
    print(f"| {packed.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
