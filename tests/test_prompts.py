"""The prompt template and the token layout, asserted position by position."""

from openalpaca.data import collate
from openalpaca.prompts import (
    BOS_ID,
    EOS_ID,
    IGNORE_INDEX,
    build_prompt,
    encode_sample,
    encode_text,
    prompt_ids,
)


def test_templates_match_the_seed_readme_character_for_character():
    assert build_prompt("What is an alpaca?") == "### Instruction:\nWhat is an alpaca?\n\n### Response:"
    assert (
        build_prompt("Summarise it.", "Some text.")
        == "### Input:\nSome text.\n\n### Instruction:\nSummarise it.\n\n### Response:"
    )
    assert build_prompt("Summarise it.", "  \n") == build_prompt("Summarise it.")


def test_token_layout_and_supervised_positions(tokenizer):
    prompt = encode_text(tokenizer, build_prompt("Repeat the words.", "red plum"))
    output = encode_text(tokenizer, "red plum")
    s = encode_sample(tokenizer, "Repeat the words.", "red plum", "red plum", max_length=1024)
    assert s.input_ids == [BOS_ID] + prompt + [EOS_ID, BOS_ID] + output + [EOS_ID]
    n_prefix = len(prompt) + 3
    assert s.labels[:n_prefix] == [IGNORE_INDEX] * n_prefix  # up to and including the second bos
    assert s.labels[n_prefix:] == output + [EOS_ID]
    assert s.num_supervised == len(output) + 1
    assert not s.truncated
    # the tokenizer's own add_bos setting is not what put the bos there
    assert BOS_ID not in prompt and EOS_ID not in output


def test_inference_prefix_equals_training_unsupervised_part(tokenizer):
    for instruction, input in [("Name a fruit.", ""), ("Repeat the words.", "one two fig")]:
        s = encode_sample(tokenizer, instruction, input, "apple", max_length=1024)
        prefix = prompt_ids(tokenizer, instruction, input)
        n_unsupervised = s.labels.index(next(label for label in s.labels if label != IGNORE_INDEX))
        assert s.input_ids[:n_unsupervised] == prefix


def test_truncation_cuts_the_response_tail_and_its_eos(tokenizer):
    full = encode_sample(tokenizer, "Repeat the words.", "kiwi lime", "kiwi lime kiwi lime kiwi", 1024)
    n_prefix = full.labels.count(IGNORE_INDEX)
    cut = encode_sample(tokenizer, "Repeat the words.", "kiwi lime", "kiwi lime kiwi lime kiwi", n_prefix + 2)
    assert cut.truncated
    assert len(cut.input_ids) == n_prefix + 2
    assert cut.input_ids == full.input_ids[: n_prefix + 2]
    assert cut.labels[n_prefix:] == full.labels[n_prefix : n_prefix + 2]
    assert cut.labels[-1] != EOS_ID  # never taught to stop mid-answer
    one = encode_sample(tokenizer, "Repeat the words.", "kiwi lime", "kiwi", n_prefix + 1)
    assert one.num_supervised == 1


def test_a_prompt_that_leaves_no_room_is_skipped(tokenizer):
    n_prefix = len(prompt_ids(tokenizer, "Repeat the words.", "kiwi lime"))
    assert encode_sample(tokenizer, "Repeat the words.", "kiwi lime", "kiwi", n_prefix) is None
    assert encode_sample(tokenizer, "Repeat the words.", "kiwi lime", "kiwi", n_prefix + 1) is not None


def test_collate_pads_right_and_supervises_only_outputs(tokenizer):
    a = encode_sample(tokenizer, "Name a fruit.", "", "apple", 1024)
    b = encode_sample(tokenizer, "Repeat the words.", "red plum fig", "red plum fig", 1024)
    batch = collate([a, b, None])
    width = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (3, width)
    for row, s in enumerate([a, b]):
        n = len(s.input_ids)
        assert batch["input_ids"][row, :n].tolist() == s.input_ids
        assert batch["labels"][row].tolist() == s.labels + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert (batch["labels"][2] == IGNORE_INDEX).all()  # a pad slot carries no loss
    supervised = (batch["labels"] != IGNORE_INDEX).sum().item()
    assert supervised == a.num_supervised + b.num_supervised
