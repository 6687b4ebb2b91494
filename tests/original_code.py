"""The original OpenAlpaca code's sample construction, written out from its facts
(../shared/notes/original-code.md), independently of openalpaca/: the tests' expected values.

``sp`` is a ``sentencepiece.SentencePieceProcessor``: the slow ``LlamaTokenizer`` the original
used gave its ids, plus a bos from ``encode``.
"""

from __future__ import annotations


def seed_prompt(instruction: str, input: str) -> str:
    """The seed README's two templates; only an empty input counts as none."""
    if input != "":
        return f"### Input:\n{input}\n\n### Instruction:\n{instruction}\n\n### Response:"
    return f"### Instruction:\n{instruction}\n\n### Response:"


def original_sample(sp, instruction: str, input: str, output: str,
                    max_length: int = 1024) -> tuple[list[int], list[int], list[int]]:
    """``[1] + s + [2] + [1] + t + [2]``, its labels and the ``ids != 2`` mask, the last ``max_length``."""
    s = [1] + sp.encode(seed_prompt(instruction, input))  # LlamaTokenizer.encode adds its bos
    t = [1] + sp.encode(output)
    ids = [1] + s + [2] + [1] + t + [2]
    labels = [1] + [-100] * len(s) + [2] + [1] + t + [2]
    mask = [int(i != 2) for i in ids]
    return ids[-max_length:], labels[-max_length:], mask[-max_length:]


def clean_sample(sp, instruction: str, input: str, output: str) -> tuple[list[int], list[int]]:
    """The clean layout: ``[1] + P + [2, 1] + O + [2]``, only O and the final eos supervised."""
    p, o = sp.encode(seed_prompt(instruction, input)), sp.encode(output)
    return [1] + p + [2, 1] + o + [2], [-100] * (len(p) + 3) + o + [2]
