"""Generation from a trained model, with exactly the training prompt.

Every prompt is ``openalpaca.prompts.prompt_ids`` in the layout the model was trained with
(``clean``: ``[1, P, 2, 1]``; ``original``: ``[1, 1, P, 2, 1]``, the seed README's snippet),
cut to its last ``max_prompt_tokens`` as the snippet does. A question asked in a conversation
comes after its earlier exchanges, each rendered as its training sample (the ids the model was
trained on, and those the chat template gives); when they do not fit ``max_prompt_tokens`` the
oldest exchanges are left out, whole. Batches are left-padded with
``PAD_ID`` and masked, so one forward pass serves a whole batch; a batch of one is exactly the
snippet's call. Answers are cleaned as the snippet does: the ids up to the first eos, decoded
with special tokens, ``<s>`` and ``</s>`` removed, stripped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from openalpaca.prompts import EOS_ID, PAD_ID, Exchange, Tokenizer, conversation_ids

MAX_PROMPT_TOKENS = 1024  # the snippet's tokens[-1024:]


@dataclass(frozen=True)
class Sampling:
    """The seed's settings by default: top-k 50, top-p 0.9, 128 new tokens."""

    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9

    def generate_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": 1}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p}


def left_pad(batch: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` with every row right-aligned, as generation needs.

    >>> ids, mask = left_pad([[1, 5, 2, 1], [1, 2, 1]])
    >>> ids.tolist(), mask.tolist()
    ([[1, 5, 2, 1], [0, 1, 2, 1]], [[1, 1, 1, 1], [0, 1, 1, 1]])
    """
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def cut_at_eos(ids: Sequence[int], eos_id: int = EOS_ID) -> list[int]:
    """The generated ids before the first EOS (the rest is padding after the row finished).

    >>> cut_at_eos([7, 8, 2, 0, 0])
    [7, 8]
    """
    ids = list(ids)
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def clean_answer(tokenizer: Tokenizer, new_ids: Sequence[int]) -> str:
    """The answer text of generated ids, cleaned as the seed README's snippet does.

    >>> class Toy:
    ...     def decode(self, ids, skip_special_tokens=False):
    ...         return "".join({1: "<s>", 2: "</s>", 7: " An", 8: " alpaca"}[i] for i in ids)
    >>> clean_answer(Toy(), [1, 7, 8, 2, 0, 0])
    'An alpaca'
    """
    text = tokenizer.decode(cut_at_eos(new_ids), skip_special_tokens=False)
    return text.replace("<s>", "").replace("</s>", "").strip()


def fitted_prompt_ids(tokenizer: Tokenizer, question: tuple[str, str], history: Sequence[Exchange], layout: str,
                      max_prompt_tokens: int = 1024) -> list[int]:
    """``prompt_ids`` of ``question`` after ``history``, the oldest exchanges left out until it fits
    ``max_prompt_tokens``; a lone question longer than that keeps its last tokens (the snippet's cut).

    An exchange's ids do not depend on what comes before it, so the conversation is built once and
    the prompt starts at the first exchange from which the rest fits.
    """
    built = conversation_ids(tokenizer, [*history, Exchange(*question, None)], layout)
    ids = built.input_ids
    start = next((span.start for span in built.spans if len(ids) - span.start <= max_prompt_tokens),
                 built.spans[-1].start)
    return ids[start:][-max_prompt_tokens:]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[tuple[str, str]],
    sampling: Sampling = Sampling(),
    batch_size: int = 16,
    streamer: Any = None,
    progress: Any = None,
    layout: str = "clean",
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    histories: Sequence[Sequence[Exchange]] | None = None,
) -> list[str]:
    """One answer per ``(instruction, input)``, in order (``clean_answer``).

    ``histories`` (one per prompt) holds the answered exchanges that come before each question
    in its conversation. Prompts are batched by similar length (less padding). ``streamer`` (a
    transformers streamer) needs ``batch_size=1``; ``progress`` is called with the size of each
    finished batch.
    """
    histories = histories if histories is not None else [()] * len(prompts)
    if len(histories) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(histories)} histories")
    ids = [fitted_prompt_ids(tokenizer, question, history, layout, max_prompt_tokens)
           for question, history in zip(prompts, histories, strict=True)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outputs = [""] * len(ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([ids[i] for i in chunk])
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
                streamer=streamer,
                **sampling.generate_kwargs(),
            )
            for row, index in enumerate(chunk):
                outputs[index] = clean_answer(tokenizer, out[row, input_ids.shape[1] :].tolist())
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return outputs
