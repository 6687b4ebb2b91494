"""Alpaca records -> encoded samples -> a deterministic per-rank plan of micro-batches.

The data order of an epoch is a pure function of (seed, epoch), so a run resumed from a
checkpoint that stored (epoch, step) sees exactly the samples the uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openalpaca.prompts import BOS_ID, IGNORE_INDEX, PAD_ID, EncodedSample, Tokenizer, encode_sample
from openalpaca.records import DataError, read_records

ALPACA_FIELDS = ("instruction", "input", "output")


def read_alpaca(path: str | Path) -> list[dict[str, Any]]:
    """Alpaca-format training or eval records, validated (see ``openalpaca.records``)."""
    return read_records(path, ALPACA_FIELDS)
PAD_SLOT = -1  # a plan slot that fills the last, partial optimizer step: it carries no loss


def split_records(records: list[dict], eval_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded ``eval_ratio`` share held out (at least one record), order kept."""
    n_eval = max(1, round(len(records) * eval_ratio))
    if n_eval >= len(records):
        raise DataError(f"eval_ratio {eval_ratio} leaves no training records out of {len(records)}")
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


@dataclass
class SFTDataset:
    """Encoded samples, each with the index of its record in the data file (its sample id)."""

    samples: list[EncodedSample]
    ids: list[int]
    num_skipped: int  # records whose prompt leaves no room for a response token within max_length
    num_truncated: int

    @classmethod
    def from_records(cls, records: list[dict[str, str]], tokenizer: Tokenizer, max_length: int) -> "SFTDataset":
        samples, ids, skipped = [], [], 0
        for i, rec in enumerate(records):
            sample = encode_sample(tokenizer, rec["instruction"], rec["input"], rec["output"], max_length)
            if sample is None:
                skipped += 1
                continue
            samples.append(sample)
            ids.append(i)
        return cls(samples, ids, skipped, sum(s.truncated for s in samples))

    def __len__(self) -> int:
        return len(self.samples)

    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)


def plan_epoch(
    num_samples: int, epoch: int, seed: int, batch_size: int, micro_batch_size: int, world_size: int, rank: int
) -> list[list[list[int]]]:
    """This rank's micro-batches for every optimizer step of one epoch: ``plan[step][micro] = [index, ...]``.

    The epoch's shuffle depends only on ``(seed, epoch)``. Each step takes ``batch_size``
    consecutive samples of it; rank ``r`` takes every ``world_size``-th of them starting at ``r``.
    The last step is filled up with ``PAD_SLOT`` so that every sample is seen exactly once per
    epoch and every rank runs the same number of micro-steps.

    >>> plan_epoch(5, epoch=0, seed=0, batch_size=4, micro_batch_size=1, world_size=2, rank=0)
    [[[4], [1]], [[2], [-1]]]
    """
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    num_steps = -(-num_samples // batch_size)
    order += [PAD_SLOT] * (num_steps * batch_size - num_samples)
    plan = []
    for step in range(num_steps):
        mine = order[step * batch_size : (step + 1) * batch_size][rank::world_size]
        plan.append([mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)])
    return plan


def collate(samples: list[EncodedSample | None]) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; ``None`` (a pad slot) becomes a one-token row with no label.

    Example, two samples and a pad slot::

        input_ids: [1, 5, 2, 1, 9, 2]   labels: [-100, -100, -100, -100, 9, 2]
                   [1, 6, 2, 1, 8]               [-100, -100, -100, -100, 8]
                   None

        input_ids      = [[1, 5, 2, 1, 9, 2], [1, 6, 2, 1, 8, 0], [1, 0, 0, 0, 0, 0]]
        labels         = [[-100, -100, -100, -100, 9, 2], [-100, -100, -100, -100, 8, -100], [-100] * 6]
        attention_mask = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    """
    rows = [s if s is not None else EncodedSample([BOS_ID], [IGNORE_INDEX], False) for s in samples]
    width = max(len(s.input_ids) for s in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, s in enumerate(rows):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def micro_batches(dataset: SFTDataset, step_plan: list[list[int]]) -> list[dict[str, Any]]:
    """Collated micro-batches of one optimizer step, each with the sample ids it holds."""
    batches = []
    for slots in step_plan:
        batch = collate([dataset.samples[i] if i != PAD_SLOT else None for i in slots])
        batch["sample_ids"] = [dataset.ids[i] for i in slots if i != PAD_SLOT]
        batches.append(batch)
    return batches
