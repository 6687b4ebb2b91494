"""The one prompt module: templates, token layouts and the ``input_ids``/``labels`` builder.

Training, evaluation and inference all build their token ids here, so the prompt the model
is trained on is exactly the prompt it is queried with. Ids are built by hand: a tokenizer's
own ``add_bos_token`` setting is never relied on (transformers 4.x and 5.x disagree on it).

Two token layouts (``P`` = the prompt's ids, ``O`` = the output's, ``enc`` without special tokens):

``original`` (the original OpenAlpaca code): its tokenizer added a bos to each encoded text and
the code added another around it::

    input_ids = [1] + ([1] + P) + [2] + [1] + ([1] + O) + [2]    =  [1, 1, P, 2, 1, 1, O, 2]
    labels    = [1] + [-100] * (1 + len(P)) + [2] + [1] + ([1] + O) + [2]

After the model's one-token shift the targets are the eos after the prompt, the bos after it,
the bos that starts the output, ``O`` and the final eos. Inference feeds ``[1, 1, P, 2, 1]``
(the seed README's snippet), so the model's first answer token is a bos.

``clean``: one bos, and only the answer is supervised::

    input_ids = [1] + P + [2, 1] + O + [2]
    labels    = [-100] * (len(P) + 3) + O + [2]

Inference feeds ``[1, P, 2, 1]``. ``labels[0]`` is never a target (nothing predicts the first
token), so counts of supervised tokens always skip it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from model.hf_tokenizer import LAYOUTS  # the chat template renders the same layouts
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "IGNORE_INDEX", "LAYOUTS", "TRUNCATIONS", "SampleFormat", "EncodedSample",
           "build_prompt", "encode_text", "prompt_ids", "encode_sample"]

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips
# keep_end: the original's ``ids[-max_length:]`` (the start of the prompt goes, no record is dropped);
# keep_prompt: the prompt stays whole and the response's tail is cut (a record with no room is dropped).
TRUNCATIONS = ("keep_end", "keep_prompt")

PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:"
PROMPT_WITH_INPUT = "### Input:\n{input}\n\n### Instruction:\n{instruction}\n\n### Response:"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def build_prompt(instruction: str, input: str = "") -> str:
    """The seed's two templates, character for character.

    Only an empty input counts as "no input"; one of only whitespace is an input, as in the
    original code (``process_dataset.py`` keeps dolly's contexts as they are).

    >>> build_prompt("Name a colour.")
    '### Instruction:\\nName a colour.\\n\\n### Response:'
    >>> build_prompt("Reverse the words.", "a b c")
    '### Input:\\na b c\\n\\n### Instruction:\\nReverse the words.\\n\\n### Response:'
    """
    if input != "":
        return PROMPT_WITH_INPUT.format(input=input, instruction=instruction)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added by the tokenizer."""
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class SampleFormat:
    """How a record becomes a training sample: token layout, truncation and attention mask.

    ``hide_eos_keys``: the original's collator set ``attention_mask = input_ids != 2``, so no
    token attends to the eos after the prompt or the final eos (at inference all are attended).
    """

    layout: str = "clean"
    truncation: str = "keep_prompt"
    hide_eos_keys: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {self.truncation!r}")


def _pieces(tokenizer: Tokenizer, instruction: str, input: str, layout: str) -> tuple[list[int], list[int]]:
    """(the unsupervised start of a sample, the tokens between it and the output), both as ids."""
    prompt = encode_text(tokenizer, build_prompt(instruction, input))
    if layout == "original":
        return [BOS_ID, BOS_ID, *prompt], [EOS_ID, BOS_ID, BOS_ID]
    if layout == "clean":
        return [BOS_ID, *prompt, EOS_ID, BOS_ID], []
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def prompt_ids(tokenizer: Tokenizer, instruction: str, input: str = "", layout: str = "clean") -> list[int]:
    """The ids inference feeds: the sample up to where the model starts answering.

    ``clean``: ``[BOS] enc(prompt) [EOS] [BOS]``; ``original``: ``[BOS] [BOS] enc(prompt) [EOS]
    [BOS]``, the seed README's snippet (its tokenizer added the second bos).
    """
    start, bridge = _pieces(tokenizer, instruction, input, layout)
    return start + bridge[:2]


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    attention_mask: list[int] | None = None  # None: every token is attended

    @property
    def mask(self) -> list[int]:
        return self.attention_mask if self.attention_mask is not None else [1] * len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        """Targets after the shift (``labels[0]`` never is one)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def encode_sample(
    tokenizer: Tokenizer, instruction: str, input: str, output: str, max_length: int,
    fmt: SampleFormat = SampleFormat(),
) -> EncodedSample | None:
    """Build ``input_ids``, ``labels`` and the attention mask of one Alpaca record.

    Worked examples with a toy tokenizer where ``enc(prompt) = [7, 8]`` and ``enc(output) = [9]``::

        clean:     input_ids = [1, 7, 8, 2, 1, 9, 2]
                   labels    = [-100, -100, -100, -100, -100, 9, 2]
        original:  input_ids = [1, 1, 7, 8, 2, 1, 1, 9, 2]
                   labels    = [1, -100, -100, -100, 2, 1, 1, 9, 2]
                   with hide_eos_keys, attention_mask = [1, 1, 1, 1, 0, 1, 1, 1, 0]

    Truncation to ``max_length``: ``keep_end`` keeps the last ``max_length`` tokens (and
    labels), as the original did: the final eos always stays. ``keep_prompt`` keeps the prompt
    whole and cuts the tail of the response, its final eos with it, so the model is never taught
    to stop in the middle of an answer; when the prompt alone leaves no room for one response
    token the sample has nothing to learn from and ``None`` is returned (the caller counts it).
    """
    start, bridge = _pieces(tokenizer, instruction, input, fmt.layout)
    target = bridge + encode_text(tokenizer, output) + [EOS_ID]
    first_label = [BOS_ID] if fmt.layout == "original" else [IGNORE_INDEX]
    input_ids = start + target
    labels = first_label + [IGNORE_INDEX] * (len(start) - 1) + target
    truncated = len(input_ids) > max_length
    if fmt.truncation == "keep_end":
        input_ids, labels = input_ids[-max_length:], labels[-max_length:]
    elif truncated:
        if max_length - len(start) < 1:
            return None
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    mask = [int(i != EOS_ID) for i in input_ids] if fmt.hide_eos_keys else None
    return EncodedSample(input_ids=input_ids, labels=labels, truncated=truncated, attention_mask=mask)
