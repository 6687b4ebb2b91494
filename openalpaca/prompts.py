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

A conversation is a list of exchanges (a user turn and the assistant's answer). Its sample is the
layout's samples of each exchange one after the other, exactly as the chat template
(``model.hf_tokenizer.chat_template``) renders earlier turns: every answer is supervised as the
layout supervises an answer, no user turn ever is. ``conversation_ids`` builds these ids for
training, evaluation (``encode_conversation``) and inference (``prompt_ids`` with a ``history``);
a one-exchange conversation is exactly the single-record sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from model.hf_tokenizer import INPUT_MARK, LAYOUTS  # the chat template renders the same layouts
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "IGNORE_INDEX", "LAYOUTS", "TRUNCATIONS", "SampleFormat", "EncodedSample",
           "Exchange", "ConversationIds", "build_prompt", "encode_text", "split_user_content", "user_content",
           "conversation_ids", "prompt_ids", "encode_sample", "encode_conversation"]

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


def split_user_content(content: str) -> tuple[str, str]:
    """A user message as ``(instruction, input)``, read as the chat template reads it: the text
    after the first ``### Input:`` is the input, and both parts are stripped.

    >>> split_user_content("Summarise the text. ### Input: Alpacas are camelids.")
    ('Summarise the text.', 'Alpacas are camelids.')
    >>> split_user_content("  Name a fruit.\\n")
    ('Name a fruit.', '')
    >>> split_user_content("Summarise. ### Input: a ### Input: b")
    ('Summarise.', 'a ### Input: b')
    """
    instruction, _, context = content.partition(INPUT_MARK)
    return instruction.strip(), context.strip()


def user_content(instruction: str, input: str = "") -> str:
    """The user message that ``split_user_content`` reads back as ``(instruction, input)``
    (for stripped texts whose instruction holds no ``### Input:``).

    >>> user_content("Summarise the text.", "Alpacas are camelids.")
    'Summarise the text. ### Input: Alpacas are camelids.'
    >>> user_content("Name a fruit.")
    'Name a fruit.'
    """
    return f"{instruction} {INPUT_MARK} {input}" if input else instruction


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


@dataclass(frozen=True)
class Exchange:
    """One exchange of a conversation: the user's instruction and optional input, then the
    assistant's answer (``None``: the question is still open, the one inference answers)."""

    instruction: str
    input: str = ""
    output: str | None = None


@dataclass(frozen=True)
class ExchangeSpan:
    """Where one exchange sits in a conversation's ids (indices into ``input_ids``)."""

    start: int  # its first token (a bos)
    first_target: int  # its first supervised label (the answer; ``original``: the eos after the prompt)
    answer_start: int  # where inference starts generating: the end of ``prompt_ids``
    end: int  # one past its last token (the final eos; ``answer_start`` for an open question)


@dataclass(frozen=True)
class ConversationIds:
    input_ids: list[int]
    labels: list[int]
    spans: list[ExchangeSpan]


def conversation_ids(tokenizer: Tokenizer, exchanges: Sequence[Exchange], layout: str = "clean") -> ConversationIds:
    """The one builder of ``input_ids`` and ``labels``: training, evaluation and inference all call it.

    Each exchange is the layout's sample, and the samples are chained as the chat template
    renders a conversation. In an exchange only what the layout supervises after a prompt is a
    target (``clean``: the answer and its eos; ``original``: the eos and bos after the prompt,
    the answer's bos, the answer, its eos); a user turn never is. The first label of the first
    exchange is the original code's ``1`` in the ``original`` layout (it is never a target:
    nothing predicts the first token); a later exchange starts with ``-100``, because its bos
    belongs to the user's turn. An exchange whose ``output`` is ``None`` must be the last: it
    ends with the inference prompt (``[..., 2, 1]``) and has no targets.

    Worked example, ``clean``, with ``enc(prompt_1) = [7, 8]``, ``enc(output_1) = [9]``,
    ``enc(prompt_2) = [5]``, ``enc(output_2) = [6, 4]``::

        input_ids = [1,    7,    8,    2,    1,    9, 2, 1,    5,    2,    1,    6, 4, 2]
        labels    = [-100, -100, -100, -100, -100, 9, 2, -100, -100, -100, -100, 6, 4, 2]

    ``original``, same texts::

        input_ids = [1, 1,    7,    8,    2, 1, 1, 9, 2, 1,    1,    5,    2, 1, 1, 6, 4, 2]
        labels    = [1, -100, -100, -100, 2, 1, 1, 9, 2, -100, -100, -100, 2, 1, 1, 6, 4, 2]

    With the second answer open (``output=None``) the ids end ``[..., 1, 5, 2, 1]`` (``clean``)
    or ``[..., 1, 1, 5, 2, 1]`` (``original``): ``prompt_ids`` with the first exchange as history.
    The same, run (a toy tokenizer that knows these four texts)::

    >>> class Toy:
    ...     def encode(self, text, add_special_tokens=False):
    ...         return {build_prompt("a"): [7, 8], "x": [9], build_prompt("b"): [5], "y z": [6, 4]}[text]
    >>> chat = [Exchange("a", "", "x"), Exchange("b", "", "y z")]
    >>> ids = conversation_ids(Toy(), chat, "clean")
    >>> ids.input_ids, ids.labels[5:8]
    ([1, 7, 8, 2, 1, 9, 2, 1, 5, 2, 1, 6, 4, 2], [9, 2, -100])
    >>> conversation_ids(Toy(), chat, "original").labels
    [1, -100, -100, -100, 2, 1, 1, 9, 2, -100, -100, -100, 2, 1, 1, 6, 4, 2]
    >>> [(s.start, s.first_target, s.answer_start, s.end) for s in ids.spans]
    [(0, 5, 5, 7), (7, 11, 11, 14)]
    >>> conversation_ids(Toy(), [chat[0], Exchange("b")], "original").input_ids[9:]
    [1, 1, 5, 2, 1]
    """
    input_ids: list[int] = []
    labels: list[int] = []
    spans = []
    for k, ex in enumerate(exchanges):
        start, bridge = _pieces(tokenizer, ex.instruction, ex.input, layout)
        at = len(input_ids)
        answer_start = at + len(start) + len(bridge[:2])
        if ex.output is None:
            if k != len(exchanges) - 1:
                raise ValueError(f"exchange {k + 1} has no answer but is not the last one")
            input_ids += start + bridge[:2]
            labels += [IGNORE_INDEX] * (len(start) + len(bridge[:2]))
        else:
            target = bridge + encode_text(tokenizer, ex.output) + [EOS_ID]
            first_label = BOS_ID if layout == "original" and k == 0 else IGNORE_INDEX
            input_ids += start + target
            labels += [first_label] + [IGNORE_INDEX] * (len(start) - 1) + target
        spans.append(ExchangeSpan(at, at + len(start), answer_start, len(input_ids)))
    return ConversationIds(input_ids, labels, spans)


def prompt_ids(tokenizer: Tokenizer, instruction: str, input: str = "", layout: str = "clean",
               history: Sequence[Exchange] = ()) -> list[int]:
    """The ids inference feeds: the sample up to where the model starts answering.

    ``clean``: ``[BOS] enc(prompt) [EOS] [BOS]``; ``original``: ``[BOS] [BOS] enc(prompt) [EOS]
    [BOS]``, the seed README's snippet (its tokenizer added the second bos). ``history`` (answered
    exchanges) comes first, each as its training sample (``conversation_ids``), as the chat
    template renders earlier turns.
    """
    return conversation_ids(tokenizer, [*history, Exchange(instruction, input, None)], layout).input_ids


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
    return encode_conversation(tokenizer, [Exchange(instruction, input, output)], max_length, fmt)


def encode_conversation(
    tokenizer: Tokenizer, exchanges: Sequence[Exchange], max_length: int, fmt: SampleFormat = SampleFormat(),
) -> EncodedSample | None:
    """``encode_sample`` for a conversation: its exchanges' samples chained (``conversation_ids``).

    Truncation to ``max_length``, a one-exchange conversation being exactly ``encode_sample``:

    * ``keep_end``: the last ``max_length`` tokens, as the original: earlier turns go first (the
      cut may fall inside one), the final eos always stays, nothing is dropped.
    * ``keep_prompt``: each exchange is cut as a single sample would be in the room the exchanges
      before it leave. Exchanges that fit stay whole; in the first one that does not, the tail of
      the answer is cut when its prompt fits with at least one target, and otherwise that exchange
      and every later one are dropped (the sample then ends with a complete answer). When the
      first exchange's prompt leaves no room for a target, ``None`` is returned (the caller
      counts it as skipped).

    With ``hide_eos_keys`` every eos of the conversation is hidden as a key, as the original's
    collator (``ids != 2``) would have done.
    """
    if any(ex.output is None for ex in exchanges):
        raise ValueError("every exchange of a training sample needs an answer")
    built = conversation_ids(tokenizer, exchanges, fmt.layout)
    input_ids, labels = built.input_ids, built.labels
    truncated = len(input_ids) > max_length
    if fmt.truncation == "keep_end":
        input_ids, labels = input_ids[-max_length:], labels[-max_length:]
    elif truncated:
        cut = max_length
        for k, span in enumerate(built.spans):
            if span.end <= max_length:
                continue
            if max_length - span.first_target < 1:
                if k == 0:
                    return None
                cut = span.start
            break
        input_ids, labels = input_ids[:cut], labels[:cut]
    mask = [int(i != EOS_ID) for i in input_ids] if fmt.hide_eos_keys else None
    return EncodedSample(input_ids=input_ids, labels=labels, truncated=truncated, attention_mask=mask)
