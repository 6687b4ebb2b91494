"""Records -> encoded samples -> the samples of each optimizer step -> micro-batches.

A record is an Alpaca record (one exchange) or a conversation (``openalpaca.conversations``); either
way it is one sample: one slot of a step, one unit of ``loss_weighting: sample``.

The data order is a pure function of ``(seed, step)``: each epoch's shuffle depends only on
``(seed, epoch)``, so a run resumed from a checkpoint that stored its step sees exactly the
samples the uninterrupted run would.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from openalpaca.conversations import ALPACA_FIELDS, Conversation, read_conversations
from openalpaca.prompts import (
    BOS_ID,
    IGNORE_INDEX,
    PAD_ID,
    EncodedSample,
    Exchange,
    SampleFormat,
    Tokenizer,
    encode_conversation,
)
from openalpaca.records import DataError, read_records


def read_alpaca(path: str | Path) -> list[dict[str, Any]]:
    """Alpaca-format training or eval records, validated (see ``openalpaca.records``)."""
    return read_records(path, ALPACA_FIELDS)


def read_training_data(paths: str | Path, data_format: str = "auto",
                       system_message: str = "refuse") -> list[Conversation]:
    """Training or eval records of any format (``openalpaca.conversations``), as conversations.

    ``paths`` may name several files, comma-separated (Alpaca records and conversations, say):
    their records one after the other, each file's format its own (``auto``) or ``data_format``.
    """
    files = [p.strip() for p in str(paths).split(",") if p.strip()] if isinstance(paths, str) else [paths]
    if not files:
        raise DataError(f"no data file given ({paths!r})")
    return [c for path in files for c in read_conversations(path, data_format, system_message)[1]]


def as_conversation(record: dict[str, str] | Conversation) -> Conversation:
    """An Alpaca record as a one-exchange conversation (its texts as they are); a conversation as is."""
    if isinstance(record, dict):
        return (Exchange(record["instruction"], record["input"], record["output"]),)
    return tuple(record)


PAD_SLOT = -1  # a plan slot that fills the last, partial optimizer step: it carries no loss


def split_records(records: list[dict], eval_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded ``eval_ratio`` share held out (at least one record), order kept."""
    n_eval = max(1, round(len(records) * eval_ratio))
    if n_eval >= len(records):
        raise DataError(f"eval_ratio {eval_ratio} leaves no training records out of {len(records)}")
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


EPOCH_TAILS = ("pad", "carry")
WEIGHTINGS = ("sample", "token")


@dataclass
class SFTDataset:
    """Encoded samples, each with the index of its record in the data file (its sample id).

    A record is an Alpaca record or a conversation (``encode_conversation``: its exchanges' samples
    chained, every answer supervised); either is one sample.
    """

    samples: list[EncodedSample]
    ids: list[int]
    num_skipped: int  # records whose (first) prompt leaves no room for a response token within max_length
    num_truncated: int

    @classmethod
    def from_records(cls, records: list[dict[str, str]] | list[Conversation], tokenizer: Tokenizer, max_length: int,
                     fmt: SampleFormat = SampleFormat()) -> SFTDataset:
        samples, ids, skipped = [], [], 0
        for i, rec in enumerate(records):
            sample = encode_conversation(tokenizer, as_conversation(rec), max_length, fmt)
            if sample is None:
                skipped += 1
                continue
            samples.append(sample)
            ids.append(i)
        return cls(samples, ids, skipped, sum(s.truncated for s in samples))

    def __len__(self) -> int:
        return len(self.samples)

    @functools.cached_property
    def lengths(self) -> list[int]:
        """Tokens of each sample (what packing plans with), computed once."""
        return [len(s.input_ids) for s in self.samples]


# ---------------------------------------------------------------------------- data order


@functools.lru_cache(maxsize=4)
def epoch_order(num_samples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The shuffle of one epoch: a function of ``(seed, epoch)`` alone."""
    return tuple(torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def total_steps(num_samples: int, epochs: int, batch_size: int, epoch_tail: str) -> int:
    """Optimizer steps of a run.

    ``pad``: every epoch ends with a partial step filled up with ``PAD_SLOT`` (each sample is
    seen exactly once per epoch). ``carry``: epochs run back to back, a step may hold the end of
    one epoch and the start of the next, and the samples left after the last full step are not
    used: ``epochs * num_samples // batch_size`` steps, the original's count.

    >>> total_steps(100, 2, 64, "pad"), total_steps(100, 2, 64, "carry")
    (4, 3)
    """
    if epoch_tail == "carry":
        return epochs * num_samples // batch_size
    return epochs * -(-num_samples // batch_size)


def epoch_of(step: int, num_samples: int, batch_size: int, epoch_tail: str) -> int:
    """The epoch that step ``step`` (0-based) starts in."""
    if epoch_tail == "carry":
        return step * batch_size // num_samples
    return step // -(-num_samples // batch_size)


def step_slots(num_samples: int, step: int, seed: int, batch_size: int, epoch_tail: str) -> list[int]:
    """The ``batch_size`` sample indices of optimizer step ``step`` (0-based), over all ranks.

    >>> step_slots(5, 0, seed=0, batch_size=4, epoch_tail="pad"), step_slots(5, 1, 0, 4, "pad")
    ([4, 0, 1, 3], [2, -1, -1, -1])
    >>> step_slots(5, 1, seed=0, batch_size=4, epoch_tail="carry")  # epoch 0's last, then epoch 1's first 3
    [2, 0, 4, 2]
    """
    if epoch_tail == "pad":
        per_epoch = -(-num_samples // batch_size)
        epoch, k = divmod(step, per_epoch)
        order = epoch_order(num_samples, seed, epoch)[k * batch_size : (k + 1) * batch_size]
        return [*order, *[PAD_SLOT] * (batch_size - len(order))]
    positions = range(step * batch_size, (step + 1) * batch_size)
    return [epoch_order(num_samples, seed, p // num_samples)[p % num_samples] for p in positions]


def rank_micro_batches(slots: list[int], micro_batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's share of a step's slots, cut into micro-batches: rank ``r`` takes every
    ``world_size``-th slot starting at ``r``.

    >>> rank_micro_batches([4, 0, 1, 3], micro_batch_size=1, world_size=2, rank=0)
    [[4], [1]]
    """
    mine = slots[rank::world_size]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


# ---------------------------------------------------------------------------- collation


def target_weights(labels: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
    """Per-position weights that make each sample's targets sum to 1 (the per-sample mean).

    ``spans`` are ``(row, start, end)`` of each sample; the weight at position ``t`` belongs to
    the target ``labels[t]`` (so a sample's first position never carries one).

    >>> target_weights(torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]]), [(0, 0, 4), (1, 0, 2)]).tolist()
    [[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]]
    """
    weights = torch.zeros(labels.shape, dtype=torch.float32)
    for row, start, end in spans:
        targets = labels[row, start + 1 : end] != IGNORE_INDEX
        if targets.any():
            weights[row, start + 1 : end] = targets / targets.sum()
    return weights


def collate(samples: list[EncodedSample | None], weighting: str = "token") -> dict[str, Any]:
    """Right-pad a micro-batch; ``None`` (a pad slot) becomes a one-token row with no label.

    Example, two samples and a pad slot::

        input_ids: [1, 5, 2, 1, 9, 2]   labels: [-100, -100, -100, -100, 9, 2]
                   [1, 6, 2, 1, 8]               [-100, -100, -100, -100, 8]
                   None

        input_ids      = [[1, 5, 2, 1, 9, 2], [1, 6, 2, 1, 8, 0], [1, 0, 0, 0, 0, 0]]
        labels         = [[-100, -100, -100, -100, 9, 2], [-100, -100, -100, -100, 8, -100], [-100] * 6]
        attention_mask = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]

    A sample's own attention mask (``hide_eos_keys``) is kept; padding is never attended.
    With ``weighting="sample"`` the batch also holds ``weights`` (``target_weights``).
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
        attention_mask[i, :n] = torch.tensor(s.mask)
    real = sum(s is not None for s in samples)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "num_padding": input_ids.numel() - sum(len(s.input_ids) for s in samples if s is not None),
             "num_samples": real}
    if weighting == "sample":
        batch["weights"] = target_weights(labels, [(i, 0, len(s.input_ids)) for i, s in enumerate(rows)])
    return batch


def micro_batches(dataset: SFTDataset, step_plan: list[list[int]], weighting: str = "token") -> list[dict[str, Any]]:
    """Collated micro-batches of one optimizer step, each with the sample ids it holds."""
    batches = []
    for slots in step_plan:
        batch = collate([dataset.samples[i] if i != PAD_SLOT else None for i in slots], weighting)
        batch["sample_ids"] = [dataset.ids[i] for i in slots if i != PAD_SLOT]
        batches.append(batch)
    return batches
