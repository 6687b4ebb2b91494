"""Greedy answers to dolly records, for exact-match evaluation of the synthetic tasks.

A thin layer over ``openalpaca.generate`` (the inference code path): the prompt is the training
prefix, batches are left-padded and masked, and each answer stops at EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from openalpaca.generate import Sampling, generate
from openalpaca.prompts import Tokenizer


def greedy_predictions(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    records: Sequence[Mapping[str, str]],
    batch_size: int = 64,
    max_new_tokens: int = 16,
    layout: str = "clean",
) -> list[str]:
    """One greedy completion per dolly record (``instruction``, ``context``), in record order."""
    prompts = [(r["instruction"], r.get("context", "")) for r in records]
    return generate(model, tokenizer, prompts, Sampling(max_new_tokens=max_new_tokens, greedy=True), batch_size,
                    layout=layout)
