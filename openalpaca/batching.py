"""How the samples of each optimizer step become this rank's micro-batches: padded or packed.

The choice is made once, here: ``Batching`` knows the run's shape (batch, micro-batch or token
budget, ranks, data order) and yields, for any step, the plan (which samples each micro-batch
holds) and the collated micro-batches. The trainer and its eval only ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openalpaca.data import (
    SFTDataset,
    epoch_of,
    micro_batches,
    rank_micro_batches,
    step_slots,
)
from openalpaca.packing import packed_micro_batches, rank_packed_micro_batches


@dataclass(frozen=True)
class Batching:
    batch_size: int  # samples per optimizer step, over all ranks
    micro_batch_size: int  # padded: samples per micro-batch
    max_tokens: int  # packed: tokens per row; 0: padded micro-batches
    seed: int
    epoch_tail: str  # "pad" or "carry" (data.total_steps)
    weighting: str  # "token" or "sample": adds per-target weights to the batches when "sample"
    world_size: int
    rank: int

    @property
    def packed(self) -> bool:
        return self.max_tokens > 0

    def epoch(self, step: int, num_samples: int) -> int:
        return epoch_of(step, num_samples, self.batch_size, self.epoch_tail)

    def plan(self, dataset: SFTDataset, step: int) -> list[list[int]]:
        """This rank's micro-batches of step ``step`` (0-based), as sample indices."""
        slots = step_slots(len(dataset), step, self.seed, self.batch_size, self.epoch_tail)
        if self.packed:
            return rank_packed_micro_batches(slots, dataset.lengths, self.max_tokens, self.world_size, self.rank)
        return rank_micro_batches(slots, self.micro_batch_size, self.world_size, self.rank)

    def micro_batches(self, dataset: SFTDataset, step: int) -> list[dict[str, Any]]:
        """The collated micro-batches of step ``step`` on this rank, each with its ``sample_ids``."""
        collate = packed_micro_batches if self.packed else micro_batches
        return collate(dataset, self.plan(dataset, step), self.weighting)

    def everything(self, dataset: SFTDataset) -> list[list[int]]:
        """This rank's share of the whole of ``dataset`` (for the eval loss); every rank gets the
        same number of micro-batches, because ZeRO-3's forward needs every rank."""
        per_pass = self.micro_batch_size * self.world_size
        slots = step_slots(len(dataset), 0, self.seed, -(-len(dataset) // per_pass) * per_pass, "pad")
        return rank_micro_batches(slots, self.micro_batch_size, self.world_size, self.rank)

    def describe(self, gradient_accumulation: int) -> str:
        if self.packed:
            return f"batch {self.batch_size} packed into rows of up to {self.max_tokens} tokens"
        return (f"{self.world_size} ranks x {gradient_accumulation} accumulation x {self.micro_batch_size} = "
                f"batch {self.batch_size}")


def token_counts(batches: list[dict[str, Any]]) -> tuple[int, int]:
    """``(tokens processed, of which padding)`` over padded or packed micro-batches."""
    return sum(b["input_ids"].numel() for b in batches), sum(b["num_padding"] for b in batches)
