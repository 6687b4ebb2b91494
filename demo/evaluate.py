"""Greedy answers to dolly records, for exact-match evaluation of the synthetic tasks.

A thin layer over ``openalpaca.generate`` (the inference code path): the prompt is the training
prefix, batches are left-padded and masked, and each answer stops at EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from openalpaca.generate import Sampling, generate
from openalpaca.prompts import Exchange, Tokenizer, split_user_content


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


def second_turn_predictions(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    chats: Sequence[Mapping],
    batch_size: int = 64,
    max_new_tokens: int = 16,
    layout: str = "clean",
) -> list[str]:
    """One greedy answer to the second question of each two-turn conversation (``messages``), asked
    after its first question and the reference first answer (the conversation as the record holds it)."""
    histories, questions = [], []
    for chat in chats:
        first, answer, second = (m["content"] for m in chat["messages"][:3])
        histories.append([Exchange(*split_user_content(first), answer)])
        questions.append(split_user_content(second))
    return generate(model, tokenizer, questions, Sampling(max_new_tokens=max_new_tokens, greedy=True), batch_size,
                    layout=layout, histories=histories)
