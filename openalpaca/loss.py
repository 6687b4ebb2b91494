"""Token-level cross-entropy, summed, so the caller decides what to normalise by."""

from __future__ import annotations

from typing import Any

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


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where a logit is scored: ``mask[b, t]`` is True when ``labels[b, t + 1]`` is supervised.

    >>> scored_positions(torch.tensor([[-100, -100, -100, 9, 2], [-100, 5, 2, -100, -100]])).int().tolist()
    [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def num_targets(labels: torch.Tensor) -> int:
    """Supervised targets of a batch: ``labels[:, 1:]`` that are not ``IGNORE_INDEX``.

    >>> num_targets(torch.tensor([[1, -100, 2, 9], [-100, -100, -100, 5]]))
    3
    """
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def sft_ce_sum(model: Any, inputs: dict[str, Any], labels: torch.Tensor,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """``token_ce_sum`` of ``model(**inputs)``, with the LM head run on the scored positions only.

    In SFT the prompt is most of a sequence and none of it is scored (the demo scores 9% of its
    positions), so projecting every position onto the vocabulary is wasted work: transformers'
    ``logits_to_keep`` (a boolean mask) gathers the scored hidden states before ``lm_head``.
    Same value and gradients as the full logits (tested); ``model`` may be a DeepSpeed engine.
    ``weights`` (aligned with ``labels``: ``weights[b, t]`` weighs the target ``labels[b, t]``)
    make it a weighted sum; None weighs every target 1.
    """
    mask = scored_positions(labels)
    logits = model(**inputs, logits_to_keep=mask).logits
    targets = labels[:, 1:][mask[:, :-1]]
    if weights is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    per_target = F.cross_entropy(logits.float(), targets, reduction="none")
    return (per_target * weights[:, 1:][mask[:, :-1]].to(per_target)).sum()
