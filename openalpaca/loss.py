"""Token-level cross-entropy, summed, so the caller decides what to normalise by."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openalpaca.prompts import IGNORE_INDEX


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions (labels != IGNORE_INDEX).

    ``labels`` are aligned with the inputs (as the collator builds them): the logits at
    position ``t`` predict ``labels[t + 1]``. Computed in fp32 whatever the logits' dtype.
    """
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
