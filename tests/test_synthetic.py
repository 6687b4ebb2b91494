"""The synthetic instruction data set: determinism, split disjointness, answers, tokenization, eval."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo import synthetic
from openalpaca.prompts import build_prompt, encode_text

DOLLY_FIELDS = {"instruction", "context", "response", "category"}
LIST_TASKS = {"reverse", "sort", "count", "upper", "longest", "nth"}


@pytest.fixture(scope="module")
def train() -> list[dict[str, str]]:
    return synthetic.make_split(1800, "train", seed=3)


@pytest.fixture(scope="module")
def heldout() -> list[dict[str, str]]:
    return synthetic.make_split(270, "heldout", seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    from demo.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(synthetic.corpus_texts(), out, vocab_size=synthetic.TOKENIZER_VOCAB_SIZE)
    return AutoTokenizer.from_pretrained(out)


def test_deterministic_for_a_seed() -> None:
    assert synthetic.make_split(90, "train", seed=7) == synthetic.make_split(90, "train", seed=7)
    assert synthetic.make_split(90, "heldout", seed=7) == synthetic.make_split(90, "heldout", seed=7)
    assert synthetic.make_split(90, "train", seed=7) != synthetic.make_split(90, "train", seed=8)
    assert synthetic.corpus_texts(seed=1) == synthetic.corpus_texts(seed=1)


def test_records_are_dolly_strings(train: list[dict[str, str]], heldout: list[dict[str, str]]) -> None:
    for record in train + heldout:
        assert set(record) == DOLLY_FIELDS
        assert all(isinstance(v, str) for v in record.values())
        assert record["instruction"] and record["response"]
        assert record["category"] in synthetic.TASKS
        assert bool(record["context"]) == (record["category"] in synthetic.CONTEXT_TASKS)


def test_every_task_in_both_splits(train: list[dict[str, str]], heldout: list[dict[str, str]]) -> None:
    assert {r["category"] for r in train} == set(synthetic.TASKS)
    assert {r["category"] for r in heldout} == set(synthetic.TASKS)
    assert len(synthetic.TASKS) >= 6
    assert {r["category"] for r in train if not r["context"]}, "some tasks have no context"


def test_every_phrasing_is_used(train: list[dict[str, str]]) -> None:
    for task, templates in synthetic.PHRASINGS.items():
        instructions = [r["instruction"] for r in train if r["category"] == task]
        assert len(templates) >= 2
        for template in templates:
            assert any(synthetic.template_regex(template).match(i) for i in instructions), template


def test_splits_disjoint_by_construction(train: list[dict[str, str]], heldout: list[dict[str, str]]) -> None:
    assert all(synthetic.split_of(r) == "train" for r in train)
    assert all(synthetic.split_of(r) == "heldout" for r in heldout)
    train_keys = {synthetic.item_key(r) for r in train}
    heldout_keys = [synthetic.item_key(r) for r in heldout]
    assert not train_keys & set(heldout_keys)
    assert len(set(heldout_keys)) == len(heldout), "held-out prompts are distinct questions"
    train_pairs = {(r["instruction"], r["context"]) for r in train}
    assert not train_pairs & {(r["instruction"], r["context"]) for r in heldout}


def test_heldout_sums_have_their_mirror_in_train(heldout: list[dict[str, str]]) -> None:
    for record in heldout:
        if record["category"] == "add":
            a, b = (dict(synthetic.item_key(record)[1])[k] for k in "ab")
            mirror = dict(record, instruction=f"Add {b} and {a} together.")
            assert a != b and synthetic.split_of(mirror) == "train"


def test_item_key_ignores_phrasing() -> None:
    third = {"instruction": "What is the third word?", "context": "cat dog fox", "response": "fox", "category": "nth"}
    number = dict(third, instruction="Copy word number 3 from the list.")
    assert synthetic.item_key(third) == synthetic.item_key(number)
    assert synthetic.split_of(third) == synthetic.split_of(number)
    with pytest.raises(ValueError):
        synthetic.item_key(dict(third, instruction="Sort the words alphabetically."))


def test_heldout_share_of_item_space() -> None:
    words = synthetic.WORDS
    items = [{"instruction": "Count the words.", "context": synthetic.list_context([a, b, c]), "response": "3",
              "category": "count"} for a in words[:15] for b in words[:15] for c in words[:15]]
    share = sum(synthetic.split_of(r) == "heldout" for r in items) / len(items)
    assert abs(share - synthetic.HELDOUT_PERCENT / 100) < 0.03


@pytest.mark.parametrize(
    ("task", "context", "response"),
    [
        ("reverse", "ant bee cat", "cat bee ant"),
        ("reverse", "tiger owl", "owl tiger"),
        ("sort", "tiger ant moose", "ant moose tiger"),
        ("sort", "cow bee camel", "bee camel cow"),
        ("upper", "fox panda", "FOX PANDA"),
        ("count", "fox panda owl cat", "4"),
        ("longest", "fox panda owl", "panda"),
    ],
)
def test_hand_checked_context_answers(task: str, context: str, response: str) -> None:
    """Rebuild each answer through the generator's own logic on a fixed context."""
    words = context.split()

    class FixedRng:
        def randint(self, lo: int, hi: int) -> int:
            return len(words)

        def sample(self, population, k: int) -> list[str]:
            return words[:k]

    _, got_context, got_response = synthetic.GENERATORS[task](FixedRng())
    assert (got_context, got_response) == (synthetic.list_context(words), response)
    assert synthetic.list_words(got_context) == words


def _answer(record: dict[str, str]) -> str:
    """An independent, obvious solver for every task, to check every generated record."""
    task, slots = record["category"], dict(synthetic.item_key(record)[1])
    words = synthetic.list_words(record["context"]) if task in LIST_TASKS else []
    if task == "reverse":
        return " ".join(words[::-1])
    if task == "sort":
        return " ".join(sorted(words))
    if task == "count":
        return str(len(words))
    if task == "upper":
        return " ".join(words).upper()
    if task == "longest":
        return max(words, key=len)
    if task == "nth":
        return words[int(slots["n"]) - 1]
    if task == "add":
        return str(int(slots["a"]) + int(slots["b"]))
    if task == "field":
        return synthetic.context_fields(record["context"])[slots["key"]]
    if task == "repeat":
        return " ".join([slots["word"]] * int(slots["k"]))
    raise AssertionError(task)


def test_every_response_is_right(train: list[dict[str, str]], heldout: list[dict[str, str]]) -> None:
    for record in train + heldout:
        assert record["response"] == _answer(record), record


@pytest.mark.parametrize(
    ("instruction", "context", "task", "response"),
    [
        ("Add 3 and 4 together.", "", "add", "7"),
        ("What is 15 plus 0 equal to?", "", "add", "15"),
        ("What is the second word?", "Animals: cat dog fox", "nth", "dog"),
        ("Copy word number 1 from the list.", "Animals: cat dog fox", "nth", "cat"),
        ("What is the color?", "- name: Anna\n- color: red", "field", "red"),
        ("Say cat 3 times.", "", "repeat", "cat cat cat"),
    ],
)
def test_hand_checked_slot_answers(instruction: str, context: str, task: str, response: str) -> None:
    record = {"instruction": instruction, "context": context, "response": response, "category": task}
    assert _answer(record) == response


def test_field_values_are_of_their_keys_kind(train: list[dict[str, str]]) -> None:
    """Every field holds a value from its own key's list, so a record reads like a real one."""
    fields = [f for r in train if r["category"] == "field" for f in synthetic.context_fields(r["context"]).items()]
    assert len(fields) > 20
    for key, value in fields:
        assert value in synthetic.FIELD_VALUES[key], (key, value)
    kinds = list(synthetic.FIELD_VALUES.values())
    assert len({v for vs in kinds for v in vs}) == sum(map(len, kinds)), "a value belongs to two keys"
    assert not {v for vs in kinds for v in vs} & set(synthetic.WORDS)


def test_longest_is_unique(train: list[dict[str, str]]) -> None:
    for record in train:
        if record["category"] == "longest":
            lengths = sorted((len(w) for w in synthetic.list_words(record["context"])), reverse=True)
            assert lengths[0] > lengths[1]


def test_weights_shift_the_mix() -> None:
    records = synthetic.make_split(1100, "train", seed=0, weights={"sort": 3})
    counts = {t: sum(r["category"] == t for r in records) for t in synthetic.TASKS}
    assert sum(counts.values()) == 1100
    assert counts["sort"] == 300 and counts["reverse"] == 100


def test_cli_weights_mix_the_train_split_only(tmp_path: Path) -> None:
    synthetic.main(["--out_dir", str(tmp_path), "--n_train", "110", "--n_heldout", "27", "--weights", "add=3, count=0"])
    train, heldout = synthetic.read_jsonl(tmp_path / "train.jsonl"), synthetic.read_jsonl(tmp_path / "heldout.jsonl")
    assert sum(r["category"] == "add" for r in train) == 33 and not any(r["category"] == "count" for r in train)
    assert {t: sum(r["category"] == t for r in heldout) for t in synthetic.TASKS} == dict.fromkeys(synthetic.TASKS, 3)
    for bad in ("add", "plus=2", "add=two"):
        with pytest.raises(ValueError, match=f"task weight {bad!r}: want TASK=NUMBER"):
            synthetic.parse_weights(bad)


def test_score_and_exact_match(heldout: list[dict[str, str]]) -> None:
    overall, per_task = synthetic.score(heldout, [r["response"] + "\n" for r in heldout])
    assert overall == 1.0 and set(per_task) == set(synthetic.TASKS)
    assert all(v == 1.0 for v in per_task.values())
    overall, per_task = synthetic.score(heldout, ["" for _ in heldout])
    assert overall == 0.0
    assert synthetic.exact_match(" cat dog ", "cat dog")
    assert not synthetic.exact_match("cat", "cat dog")
    with pytest.raises(ValueError):
        synthetic.score(heldout, [])


# Adversarial predictions against references of every task kind. Allowed: whitespace at either end
# (a generation may end with a space or a newline). Not allowed: anything else, including
# whitespace inside the text (the references are single-spaced).
EXACT_ACCEPTED = ["{r}", " {r}", "{r} ", "\n{r}\n", "\t{r}\r\n", "  {r}   "]
EXACT_REJECTED = [
    "{r} {r}",  # starts with the reference
    "{r} fox",  # one extra word
    "{r}fox",  # glued extra text
    "the {r}",  # a word in front
    "{r}.",  # trailing punctuation
    "{r},",
    '"{r}"',
    "{upper}",  # another case
    "{title}",
    "{r_double_space}",  # whitespace inside
    "{r_newline}",
    "",
]


@pytest.mark.parametrize("reference", ["cat", "cat dog", "Oslo", "12", "Ant Bee Cow", "cat, dog"])
def test_exact_match_rejects_adversarial_predictions(reference: str) -> None:
    words = reference.split(" ")
    fill = {"r": reference, "upper": reference.upper() if reference.upper() != reference else reference.lower(),
            "title": reference.swapcase(), "r_double_space": "  ".join(words) if len(words) > 1 else reference + "  x",
            "r_newline": "\n".join(words) if len(words) > 1 else reference + "\nx"}
    for template in EXACT_ACCEPTED:
        assert synthetic.exact_match(template.format(**fill), reference), template
    for template in EXACT_REJECTED:
        prediction = template.format(**fill)
        if prediction.strip() == reference:  # e.g. swapcase of "12": not an adversarial case here
            continue
        assert not synthetic.exact_match(prediction, reference), (template, prediction)
    # the reference's own surrounding whitespace does not matter either
    assert synthetic.exact_match(reference, f" {reference}\n")


def test_score_counts_only_exact_answers(heldout: list[dict[str, str]]) -> None:
    """score() over records: a prefix-only, an extended and a case-changed answer each score 0."""
    records = heldout[:4]
    predictions = [records[0]["response"], records[1]["response"] + " extra", records[2]["response"].upper() + "X",
                   records[3]["response"].split(" ")[0] + " " + records[3]["response"]]
    overall, _ = synthetic.score(records, predictions)
    assert overall == 0.25


def test_every_word_is_one_token(tokenizer, train: list[dict[str, str]], heldout: list[dict[str, str]]) -> None:
    """In the training layout, each word, number, punctuation mark and newline is one token."""
    unit = re.compile(r"#+|\w+|[^\w\s]|\n")
    for record in train + heldout:
        for text in (build_prompt(record["instruction"], record["context"]), record["response"]):
            ids = encode_text(tokenizer, text)
            assert len(ids) == len(unit.findall(text)), tokenizer.convert_ids_to_tokens(ids)
    for word in synthetic.vocabulary():
        assert len(encode_text(tokenizer, word)) == 1, word


def test_cli_writes_dolly_jsonl(tmp_path: Path) -> None:
    synthetic.main(["--out_dir", str(tmp_path), "--n_train", "40", "--n_heldout", "20", "--seed", "5"])
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    heldout = synthetic.read_jsonl(tmp_path / "heldout.jsonl")
    assert len(train) == 40 and len(heldout) == 20
    assert train == synthetic.make_split(40, "train", seed=5)
    assert all(set(r) == DOLLY_FIELDS for r in train + heldout)


def test_greedy_predictions_on_tiny_model(tokenizer, heldout: list[dict[str, str]]) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from demo.evaluate import greedy_predictions
    from demo.tiny import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer), hidden_size=32, num_layers=2))
    records = heldout[:7]
    predictions = greedy_predictions(model, tokenizer, records, batch_size=3, max_new_tokens=4)
    assert len(predictions) == len(records)
    assert all(isinstance(p, str) for p in predictions)
    single = greedy_predictions(model, tokenizer, records[:1], batch_size=1, max_new_tokens=4)
    assert single[0] == predictions[0], "left padding must not change a prompt's completion"


# ---------------------------------------------------------------- two-turn conversations


@pytest.fixture(scope="module")
def chats() -> list[dict]:
    return synthetic.make_chats(120, "train", seed=3, weights={"sort+upper": 2})


@pytest.fixture(scope="module")
def heldout_chats() -> list[dict]:
    return synthetic.make_chats(40, "heldout", seed=3)


def test_chats_are_deterministic_and_split_by_their_first_turn(chats, heldout_chats, train) -> None:
    assert synthetic.make_chats(120, "train", seed=3, weights={"sort+upper": 2}) == chats
    assert synthetic.make_chats(120, "train", seed=4) != chats
    assert {synthetic.chat_split_of(c) for c in chats} == {"train"}
    assert {synthetic.chat_split_of(c) for c in heldout_chats} == {"heldout"}
    # a held-out conversation opens with a question trained on nowhere, alone or in a conversation
    trained = {synthetic.item_key(r) for r in train} | {synthetic.item_key(synthetic.first_turn(c)) for c in chats}
    firsts = [(synthetic.item_key(synthetic.first_turn(c)), c["category"]) for c in heldout_chats]
    assert not {key for key, _ in firsts} & trained and len(set(firsts)) == len(firsts)
    counts = {t: sum(c["category"] == t for c in chats) for t in synthetic.CHAT_TASKS}
    assert counts == {"reverse+upper": 24, "reverse+first": 24, "sort+upper": 48, "sort+first": 24}
    assert {sum(c["category"] == t for c in heldout_chats) for t in synthetic.CHAT_TASKS} == {10}


def test_chat_answers_are_right(chats, heldout_chats) -> None:
    for chat in chats + heldout_chats:
        assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "user", "assistant"]
        first, answer, second, follow = (m["content"] for m in chat["messages"])
        task, kind = chat["category"].split("+")
        instruction, context = first.split(" ### Input: ")
        words = synthetic.list_words(context)
        assert answer == " ".join(sorted(words) if task == "sort" else reversed(words))
        assert second in synthetic.FOLLOW_UPS[kind]
        assert follow == (answer.upper() if kind == "upper" else answer.split()[0])


def test_chats_read_as_conversations_and_fit_the_demos_max_length(tmp_path, chats, heldout_chats) -> None:
    """The trainer reads them as two exchanges each, and none is cut at config/demo.yaml's max_length."""
    import yaml

    from demo.tiny import train_tokenizer
    from model.llama import load_tokenizer
    from openalpaca.data import SFTDataset, read_training_data
    from openalpaca.prompts import SampleFormat

    train_tokenizer(synthetic.corpus_texts(), tmp_path / "tok", vocab_size=synthetic.TOKENIZER_VOCAB_SIZE)
    path = synthetic.write_jsonl(chats + heldout_chats, tmp_path / "chats.jsonl")
    records = read_training_data(path)
    assert all(len(r) == 2 for r in records)
    max_length = yaml.safe_load((Path(__file__).parents[1] / "config" / "demo.yaml").read_text())["max_length"]
    ds = SFTDataset.from_records(records, load_tokenizer(tmp_path / "tok"), max_length, SampleFormat())
    assert (len(ds), ds.num_truncated, ds.num_skipped) == (len(records), 0, 0)


def test_second_turns_are_asked_after_the_first_exchange(tokenizer, heldout_chats, monkeypatch) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from demo.evaluate import second_turn_predictions
    from demo.tiny import llama_config
    from openalpaca.prompts import Exchange, prompt_ids

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tokenizer), hidden_size=32, num_layers=2))
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["input_ids"][0].tolist()) or real(**kw))
    chat = heldout_chats[0]
    first, answer, second, _ = (m["content"] for m in chat["messages"])
    assert len(second_turn_predictions(model, tokenizer, [chat], batch_size=1, max_new_tokens=2)) == 1
    instruction, context = first.split(" ### Input: ")
    assert seen == [prompt_ids(tokenizer, second, "", "clean", history=[Exchange(instruction, context, answer)])]


def test_cli_writes_conversations(tmp_path: Path) -> None:
    synthetic.main(["--out_dir", str(tmp_path), "--n_train", "4", "--n_heldout", "4", "--n_chats", "12",
                    "--n_heldout_chats", "8", "--chat_weights", "sort+first=2", "--seed", "5"])
    assert synthetic.read_jsonl(tmp_path / "chats.jsonl") == synthetic.make_chats(12, "train", 5, {"sort+first": 2})
    assert synthetic.read_jsonl(tmp_path / "heldout_chats.jsonl") == synthetic.make_chats(8, "heldout", 5)


def test_demo_check_fails_below_a_floor_with_one_line(tmp_path: Path, capsys) -> None:
    from demo.__main__ import main

    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"exact_match": 0.975, "second_turn_exact_match": 0.8875}))
    assert main(["check", str(report)]) == 1
    assert capsys.readouterr().err == f"error: {report}: second_turn_exact_match 0.89 is below 0.90\n"
    assert main(["check", str(report), "--second_turn_exact_match", "0.85"]) == 0
    assert main(["check", str(tmp_path / "none.json")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'none.json'}: not a readable report")
