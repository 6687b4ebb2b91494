"""The one prompt module: templates, special ids and the ``input_ids``/``labels`` builder.

Training, evaluation and inference all build their token ids here, so the prompt the model
is trained on is exactly the prompt it is queried with.

Token layout (the seed README's inference snippet, made explicit)::

    [BOS] enc(prompt) [EOS] [BOS] enc(output) [EOS]
    |------------ prefix --------| |-- supervised --|

``labels`` are ``IGNORE_INDEX`` over the whole prefix (up to and including the second BOS),
then the output ids and the final EOS. Ids are built by hand: a tokenizer's own
``add_bos_token`` setting is never relied on (transformers 4.x and 5.x disagree on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

BOS_ID = 1  # OpenLLaMA: <s>
EOS_ID = 2  # OpenLLaMA: </s>
PAD_ID = 0  # OpenLLaMA's config.json sets pad_token_id 0 (<unk>); pads are never attended or supervised
IGNORE_INDEX = -100  # label value that torch's cross-entropy skips

PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:"
PROMPT_WITH_INPUT = "### Input:\n{input}\n\n### Instruction:\n{instruction}\n\n### Response:"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def build_prompt(instruction: str, input: str = "") -> str:
    """The seed's two templates, character for character.

    An input that is empty or only whitespace counts as "no input".

    >>> build_prompt("Name a colour.")
    '### Instruction:\\nName a colour.\\n\\n### Response:'
    >>> build_prompt("Reverse the words.", "a b c")
    '### Input:\\na b c\\n\\n### Instruction:\\nReverse the words.\\n\\n### Response:'
    """
    if input.strip():
        return PROMPT_WITH_INPUT.format(input=input, instruction=instruction)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added by the tokenizer."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def prompt_ids(tokenizer: Tokenizer, instruction: str, input: str = "") -> list[int]:
    """The prefix the model continues: ``[BOS] enc(prompt) [EOS] [BOS]``.

    Inference feeds exactly this; training uses it as the unsupervised part of a sample.
    """
    return [BOS_ID] + encode_text(tokenizer, build_prompt(instruction, input)) + [EOS_ID, BOS_ID]


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_sample(
    tokenizer: Tokenizer, instruction: str, input: str, output: str, max_length: int
) -> EncodedSample | None:
    """Build ``input_ids`` and ``labels`` for one Alpaca record.

    Truncation to ``max_length`` keeps the prompt whole and cuts the tail of the response; the
    final EOS goes with it, so the model is never taught to stop in the middle of an answer.
    When the prefix alone leaves no room for a single response token the sample has nothing to
    learn from and ``None`` is returned (the caller skips and counts it).

    Worked example with a toy tokenizer where ``enc(prompt) = [7, 8]`` and ``enc(output) = [9]``::

        input_ids = [1, 7, 8, 2, 1, 9, 2]
        labels    = [-100, -100, -100, -100, -100, 9, 2]
    """
    prefix = prompt_ids(tokenizer, instruction, input)
    target = encode_text(tokenizer, output) + [EOS_ID]
    room = max_length - len(prefix)
    if room < 1:
        return None
    truncated = len(target) > room
    target = target[:room]
    return EncodedSample(
        input_ids=prefix + target,
        labels=[IGNORE_INDEX] * len(prefix) + target,
        truncated=truncated,
    )
