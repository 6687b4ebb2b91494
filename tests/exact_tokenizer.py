"""The check every folder the project writes must pass: ``AutoTokenizer`` gives sentencepiece's ids.

Expected ids come from ``SentencePieceProcessor`` on ``tokenizer.model`` and prompt text written
out here by hand, never from ``model.hf_tokenizer`` or ``openalpaca.prompts``.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from bench.tokenizer_exactness import PROBES, has_special_string

QUESTIONS = [("What is an alpaca?", ""), ("Summarise it.", "Some  text.\nMore."),
             ("Ｆｕｌｌ　ｗｉｄｔｈ", "ﬁve  ﬂags ")]


def prompt_text(instruction: str, input: str) -> str:
    """The seed README's two templates, written out."""
    if input:
        return f"### Input:\n{input}\n\n### Instruction:\n{instruction}\n\n### Response:"
    return f"### Instruction:\n{instruction}\n\n### Response:"


def user_message(instruction: str, input: str) -> dict[str, str]:
    """The chat convention: ``INSTRUCTION ### Input: CONTEXT``."""
    return {"role": "user", "content": f"{instruction} ### Input: {input}" if input else instruction}


def expected_prompt(sp: spm.SentencePieceProcessor, instruction: str, input: str, layout: str) -> list[int]:
    """original ``[1, 1, P, 2, 1]``, clean ``[1, P, 2, 1]``."""
    bos = [1, 1] if layout == "original" else [1]
    return [*bos, *sp.encode(prompt_text(instruction.strip(), input.strip())), 2, 1]


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def assert_exact_tokenizer(folder: str | Path, layout: str) -> None:
    """``AutoTokenizer.from_pretrained(folder)``: sentencepiece's ids and text for every probe, the
    original's bos, OpenLLaMA's special ids, and the ``layout``'s prompt from the chat template."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)
    for text in PROBES:
        ids = sp.encode(text)
        split = {"split_special_tokens": True} if has_special_string(text) else {}
        assert tok(text, add_special_tokens=False, **split)["input_ids"] == ids, repr(text)
        assert tok(text, **split)["input_ids"] == [1, *ids], repr(text)  # the original's add_bos_token
        assert tok.decode(ids) == sp.decode(ids), repr(text)
    for instruction, input in QUESTIONS:
        assert chat_ids(tok, [user_message(instruction, input)]) == expected_prompt(sp, instruction, input, layout)
