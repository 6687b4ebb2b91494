"""The prompt templates and both token layouts, asserted position by position.

Expected values are built here from the facts of the original code (the seed README's
templates, ``LlamaTokenizer.encode`` = bos + sentencepiece ids, ``[1] + s + [2] + [1] + t + [2]``,
``labels = [1] + [-100] * len(s) + [2] + [1] + t + [2]``, ``attention_mask = ids != 2``,
``ids[-max_length:]``), with sentencepiece itself as the tokenizer, never with the code under test.
"""

import pytest
import sentencepiece as spm

from openalpaca.data import collate
from openalpaca.prompts import IGNORE_INDEX, SampleFormat, build_prompt, encode_sample, prompt_ids
from tests.original_code import original_sample, seed_prompt

ORIGINAL = SampleFormat("original", "keep_end", hide_eos_keys=True)
CLEAN = SampleFormat("clean", "keep_prompt", hide_eos_keys=False)
RECORDS = [
    ("Name a fruit.", "", "apple"),
    ("Repeat the words.", "red plum fig", "red plum fig"),
    ("Repeat the words.", "  ", "kiwi"),  # a whitespace-only input is an input, as in the original
]



@pytest.fixture(scope="module")
def sp(tiny_model_dir):
    return spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))



def test_templates_match_the_seed_readme_character_for_character():
    assert build_prompt("What is an alpaca?") == "### Instruction:\nWhat is an alpaca?\n\n### Response:"
    assert (
        build_prompt("Summarise it.", "Some text.")
        == "### Input:\nSome text.\n\n### Instruction:\nSummarise it.\n\n### Response:"
    )
    expected = "### Input:\n  \n\n\n### Instruction:\nSummarise it.\n\n### Response:"
    assert build_prompt("Summarise it.", "  \n") == expected


@pytest.mark.parametrize("record", RECORDS)
def test_original_layout_ids_labels_and_mask(tokenizer, sp, record):
    ids, labels, mask = original_sample(sp, *record)
    s = encode_sample(tokenizer, *record, max_length=1024, fmt=ORIGINAL)
    assert (s.input_ids, s.labels, s.mask) == (ids, labels, mask)
    assert ids[:2] == [1, 1] and not s.truncated
    # after the shift: the eos after the prompt, the bos after it, the output's bos, O, the final eos
    targets = [label for label in labels[1:] if label != -100]
    assert targets == [2, 1, 1, *sp.encode(record[2]), 2]
    assert s.num_supervised == len(targets)


@pytest.mark.parametrize("record", RECORDS)
def test_clean_layout_ids_labels_and_mask(tokenizer, sp, record):
    prompt, output = sp.encode(seed_prompt(*record[:2])), sp.encode(record[2])
    s = encode_sample(tokenizer, *record, max_length=1024, fmt=CLEAN)
    assert s.input_ids == [1] + prompt + [2, 1] + output + [2]
    assert s.labels == [-100] * (len(prompt) + 3) + output + [2]
    assert s.mask == [1] * len(s.input_ids) and s.attention_mask is None
    assert s.num_supervised == len(output) + 1


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_hide_eos_keys_is_its_own_switch(tokenizer, layout):
    s = encode_sample(tokenizer, *RECORDS[1], max_length=1024, fmt=SampleFormat(layout, "keep_end", True))
    assert s.mask == [int(i != 2) for i in s.input_ids] and s.mask.count(0) == 2


def test_keep_end_truncation_is_the_originals_last_max_length(tokenizer, sp):
    record = ("Repeat the words.", "kiwi lime " * 6, "kiwi lime " * 6)
    ids, labels, mask = original_sample(sp, *record)
    for length in (len(ids) - 1, 12, 3):
        s = encode_sample(tokenizer, *record, max_length=length, fmt=ORIGINAL)
        assert (s.input_ids, s.labels, s.mask) == (ids[-length:], labels[-length:], mask[-length:])
        assert s.truncated and s.input_ids[-1] == 2 and s.labels[-1] == 2  # the final eos always stays
    clean = encode_sample(tokenizer, *record, max_length=12, fmt=SampleFormat("clean", "keep_end"))
    full = encode_sample(tokenizer, *record, max_length=1024, fmt=CLEAN)
    assert clean.input_ids == full.input_ids[-12:] and clean.labels == full.labels[-12:]


def test_keep_prompt_truncation_cuts_the_response_and_drops_what_has_no_room(tokenizer, sp):
    record = ("Repeat the words.", "kiwi lime", "kiwi lime kiwi lime kiwi")
    for fmt, n_prefix in [(CLEAN, len(sp.encode(seed_prompt(*record[:2]))) + 3),
                          (SampleFormat("original", "keep_prompt", True),
                           len(sp.encode(seed_prompt(*record[:2]))) + 2)]:
        full = encode_sample(tokenizer, *record, max_length=1024, fmt=fmt)
        cut = encode_sample(tokenizer, *record, max_length=n_prefix + 2, fmt=fmt)
        assert cut.truncated and cut.input_ids == full.input_ids[: n_prefix + 2]
        assert cut.labels == full.labels[: n_prefix + 2] and cut.labels[-1] != 2  # never taught to stop mid-answer
        assert encode_sample(tokenizer, *record, max_length=n_prefix, fmt=fmt) is None
        assert encode_sample(tokenizer, *record, max_length=n_prefix + 1, fmt=fmt).num_supervised == 1


def test_inference_prefix_is_the_seed_snippets_and_the_trained_prefix(tokenizer, sp):
    for instruction, input, output in RECORDS:
        prompt = sp.encode(seed_prompt(instruction, input))
        # the seed README: [bos] + tokenizer.encode(prompt) + [eos] + [bos], encode adding its own bos
        assert prompt_ids(tokenizer, instruction, input, "original") == [1] + [1] + prompt + [2] + [1]
        assert prompt_ids(tokenizer, instruction, input, "clean") == [1] + prompt + [2, 1]
        for fmt in (ORIGINAL, CLEAN):
            s = encode_sample(tokenizer, instruction, input, output, 1024, fmt)
            prefix = prompt_ids(tokenizer, instruction, input, fmt.layout)
            assert s.input_ids[: len(prefix)] == prefix
            # what the model is trained to say next is the output (after one bos in the original)
            rest = [label for label in s.labels[len(prefix):]]
            assert rest == ([1] if fmt.layout == "original" else []) + sp.encode(output) + [2]


@pytest.mark.parametrize("fmt", [ORIGINAL, CLEAN])
def test_collate_pads_right_and_keeps_each_samples_mask(tokenizer, fmt):
    a = encode_sample(tokenizer, "Name a fruit.", "", "apple", 1024, fmt)
    b = encode_sample(tokenizer, "Repeat the words.", "red plum fig", "red plum fig", 1024, fmt)
    batch = collate([a, b, None])
    width = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (3, width)
    for row, s in enumerate([a, b]):
        n = len(s.input_ids)
        assert batch["input_ids"][row, :n].tolist() == s.input_ids
        assert batch["labels"][row].tolist() == s.labels + [IGNORE_INDEX] * (width - n)
        expected_mask = [int(i != 2) for i in s.input_ids] if fmt.hide_eos_keys else [1] * n
        assert batch["attention_mask"][row].tolist() == expected_mask + [0] * (width - n)
    assert (batch["labels"][2] == IGNORE_INDEX).all()  # a pad slot carries no loss
    supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert supervised == a.num_supervised + b.num_supervised


def test_sample_weights_make_each_sample_count_once(tokenizer):
    samples = [encode_sample(tokenizer, *r, max_length=1024, fmt=ORIGINAL) for r in RECORDS]
    batch = collate([*samples, None], weighting="sample")
    w = batch["weights"]
    assert w.sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    targets = batch["labels"] != IGNORE_INDEX
    targets[:, 0] = False
    assert ((w > 0) == targets).all()
    for row, s in enumerate(samples):
        assert w[row][targets[row]].tolist() == pytest.approx([1 / s.num_supervised] * s.num_supervised)
