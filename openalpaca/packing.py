"""Padding-free packing: several samples per micro-batch row, each attending only to itself.

The seed runs one ~220-token sample per micro-batch, so under ZeRO-3 every sample pays a full
gather of the weights in forward and backward. Packing puts the samples of an optimizer step
into as few rows as fit a token budget, with three guarantees that keep the result per sample
the seed's:

* **Same steps.** Step ``s`` holds exactly the samples of ``data.step_slots`` for ``s`` (same
  shuffle of ``(seed, epoch)``, same ``batch_size`` samples per step), so steps per epoch,
  samples per step, lr and schedule mean what they mean unpacked; only how a step's samples
  are cut into micro-batches differs.
* **Own attention and positions.** Position ids restart at 0 for every sample, and attention
  is block-diagonal: ``cu_seq_lens`` mark the sample boundaries and the attention in
  ``model/attention.py`` runs on each sample's segment alone, so no FLOP is spent on a masked
  block.
* **Own labels.** A sample's first token is never a target, so the last token of one sample is
  never trained to predict the first token of the next.

The trainer normalises the loss over the whole optimizer step (all micro-batches, all ranks),
per token or per sample (``loss_weighting``), so a packed step's gradient equals the unpacked
one up to float rounding under either weighting.

How the config maps: ``batch_size`` keeps its meaning (samples per optimizer step over all
ranks), so steps, warmup and decay are as unpacked; ``max_tokens_per_micro_batch``
(0: ``max_length``) bounds a row; ``micro_batch_size`` must stay 1 and DeepSpeed's
``gradient_accumulation_steps`` stays ``batch_size / world`` in its JSON, where it only scales
the loss, a scale the trainer undoes.

A packed step may need a different number of micro-batches than the next one. Every rank runs
the same number within a step (empty "pad" micro-batches, one unsupervised token, fill the
gap, because ZeRO-3's collectives need every rank in every micro-step), and the trainer tells
DeepSpeed where the step ends (``engine.set_gradient_accumulation_boundary``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch

from openalpaca.data import PAD_SLOT, SFTDataset, target_weights
from openalpaca.prompts import BOS_ID, IGNORE_INDEX, EncodedSample

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                "max_length_q", "max_length_k")  # batch keys the model's forward takes


# ---------------------------------------------------------------------------- planning


def pack_step(indices: Sequence[int], lengths: Sequence[int], max_tokens: int, num_ranks: int) -> list[list[int]]:
    """Cut one optimizer step's samples into ``num_ranks * k`` rows of at most ``max_tokens`` tokens.

    ``k`` (micro-batches per rank) starts at the lower bound ``ceil(tokens / (num_ranks *
    max_tokens))`` and grows only when the samples do not fit. Longest sample first, each goes
    to the least-filled row: rows come out nearly equal, which matters because under ZeRO-3 a
    micro-step lasts as long as its fullest row on any rank. Rows, fullest first, are dealt to
    the ``W`` ranks in a snake order (rank ``r`` gets the ``r``-th, the ``(2W-1-r)``-th, the
    ``(2W+r)``-th, ...) so that no rank always gets the fuller one, and returned so that rank
    ``r``'s micro-batches are ``rows[r::W]``. An empty row is a pad micro-batch. Ties break on
    the index: deterministic.

    Four samples of 5, 3, 4 and 2 tokens, rows of at most 6 tokens, two ranks: 14 tokens need
    two micro-batches per rank. Rank ``r`` takes rows ``r, r + 2``: rank 0 runs sample 0 then
    sample 3 (5 + 2 tokens), rank 1 sample 2 then sample 1 (4 + 3 tokens)::

    >>> pack_step([0, 1, 2, 3], lengths=[5, 3, 4, 2], max_tokens=6, num_ranks=2)
    [[0], [2], [3], [1]]
    """
    too_long = [i for i in indices if lengths[i] > max_tokens]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, over the budget of {max_tokens}")
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    k = max(1, math.ceil(sum(lengths[i] for i in indices) / (num_ranks * max_tokens)))
    while True:
        rows: list[list[int]] = [[] for _ in range(num_ranks * k)]
        load = [0] * len(rows)
        for i in order:
            r = min(range(len(rows)), key=lambda j: (load[j], j))
            if load[r] + lengths[i] > max_tokens:
                break
            rows[r].append(i)
            load[r] += lengths[i]
        else:
            break
        k += 1
    by_load = sorted(range(len(rows)), key=lambda j: (-load[j], j))
    dealt: list[list[int]] = [[] for _ in range(num_ranks)]
    for n, j in enumerate(by_load):
        lap, pos = divmod(n, num_ranks)
        dealt[pos if lap % 2 == 0 else num_ranks - 1 - pos].append(j)
    return [rows[j] for lap in range(k) for j in (d[lap] for d in dealt)]


def rank_packed_micro_batches(slots: Sequence[int], lengths: Sequence[int], max_tokens: int, world_size: int,
                              rank: int) -> list[list[int]]:
    """This rank's packed micro-batches of one step (``data.step_slots``): ``[[index, ...], ...]``.

    Every rank computes the same global packing of the step and takes its share, so every
    sample of the step is used once and all ranks run the same number of micro-steps; ``[]`` is
    a pad micro-batch.

    >>> lengths = [5, 3, 4, 2, 6]
    >>> rank_packed_micro_batches([4, 0, 1, 3], lengths, max_tokens=8, world_size=2, rank=0)
    [[4, 3]]
    >>> rank_packed_micro_batches([4, 0, 1, 3], lengths, max_tokens=8, world_size=2, rank=1)
    [[0, 1]]
    """
    return pack_step([i for i in slots if i != PAD_SLOT], lengths, max_tokens, world_size)[rank::world_size]


# ---------------------------------------------------------------------------- collation


def collate_packed(samples: Sequence[EncodedSample], weighting: str = "token") -> dict[str, Any]:
    """Concatenate a micro-batch's samples into one row, with no padding at all.

    Position ids restart at 0 for each sample and ``cu_seq_lens`` (cumulative sample lengths,
    int32 as flash-attention wants them) tell the attention where each sample starts. Each
    sample's first label is ``IGNORE_INDEX`` whatever it was: the logits at the last token of
    a sample must not be trained to predict the first token of the next one (unpacked, the
    first label is never a target either). An empty list (a pad micro-batch) gives a one-token
    row with no label. A sample's own attention mask (``hide_eos_keys``) comes along as
    ``attention_mask`` when it hides anything; ``weighting="sample"`` adds ``weights``
    (``data.target_weights``). Worked example::

        sample a: input_ids [1, 5, 2, 1, 9, 2]  labels [-100, -100, -100, -100, 9, 2]
        sample b: input_ids [1, 6, 2, 1, 8]     labels [-100, -100, -100, -100, 8]

    >>> a = EncodedSample([1, 5, 2, 1, 9, 2], [-100, -100, -100, -100, 9, 2], False)
    >>> b = EncodedSample([1, 6, 2, 1, 8], [-100, -100, -100, -100, 8], False)
    >>> batch = collate_packed([a, b])
    >>> batch["input_ids"].tolist()
    [[1, 5, 2, 1, 9, 2, 1, 6, 2, 1, 8]]
    >>> batch["labels"].tolist()
    [[-100, -100, -100, -100, 9, 2, -100, -100, -100, -100, 8]]
    >>> batch["position_ids"].tolist()
    [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    >>> batch["cu_seq_lens_q"].tolist(), batch["max_length_q"], batch["num_padding"]
    ([0, 6, 11], 6, 0)
    >>> collate_packed([])["input_ids"].tolist(), collate_packed([])["num_padding"]
    ([[1]], 1)
    """
    rows = list(samples) or [EncodedSample([BOS_ID], [IGNORE_INDEX], False)]
    input_ids, labels, positions, lengths, mask = [], [], [], [], []
    for s in rows:
        input_ids += s.input_ids
        labels += [IGNORE_INDEX] + list(s.labels[1:])
        positions += range(len(s.input_ids))
        lengths.append(len(s.input_ids))
        mask += s.mask
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    batch = {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "num_padding": 0 if samples else 1,
        "num_samples": len(samples),
    }
    if not all(mask):
        batch["attention_mask"] = torch.tensor([mask])
    if weighting == "sample":
        starts = cu.tolist()
        batch["weights"] = target_weights(batch["labels"], [(0, a, b) for a, b in pairwise(starts)])
    return batch


def packed_micro_batches(dataset: SFTDataset, step_plan: list[list[int]],
                         weighting: str = "token") -> list[dict[str, Any]]:
    """Collated packed micro-batches of one optimizer step, each with the sample ids it holds."""
    batches = []
    for slots in step_plan:
        batch = collate_packed([dataset.samples[i] for i in slots], weighting)
        batch["sample_ids"] = [dataset.ids[i] for i in slots]
        batches.append(batch)
    return batches


def model_inputs(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The forward kwargs of a seed or a packed micro-batch, tensors moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in MODEL_INPUTS}
