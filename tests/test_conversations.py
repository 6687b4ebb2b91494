"""Conversations: the three record formats, their tensors, the chat-template invariant, bad records.

Expected ids are written out here with sentencepiece and the seed's prompt text
(``tests/original_code.py``), never with ``openalpaca.prompts``. The invariant is checked as a user
meets it: ``AutoTokenizer`` on the folder the trainer writes, the conversation's turns before each
answer through ``apply_chat_template(..., add_generation_prompt=True)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from bench.tokenizer_exactness import train_sp_model
from openalpaca.conversations import read_conversations
from openalpaca.data import SFTDataset, collate, read_training_data
from openalpaca.packing import collate_packed
from openalpaca.prompts import Exchange, SampleFormat, encode_conversation, encode_sample
from openalpaca.records import DataError
from tests.conftest import REPO, WORDS, run
from tests.original_code import original_sample, seed_prompt
from tests.test_packing import assert_packed_step_equals_unpacked

MARK = "### Input:"
FORMATS = {"original": SampleFormat("original", "keep_end", hide_eos_keys=True),
           "clean": SampleFormat("clean", "keep_prompt", hide_eos_keys=False)}


# ---------------------------------------------------------------- written out here, independently


def split_user(content: str) -> tuple[str, str]:
    """The chat template's reading of a user message: the text after the first mark is the input, both stripped."""
    instruction, _, context = content.partition(MARK)
    return instruction.strip(), context.strip()


def expected_sample(sp, messages: list[dict], layout: str) -> tuple[list[int], list[int]]:
    """The layout's samples of each exchange one after the other; a later exchange's first label is -100."""
    ids, labels = [], []
    for k in range(0, len(messages), 2):
        instruction, context = split_user(messages[k]["content"])
        answer = messages[k + 1]["content"]
        if layout == "original":
            one_ids, one_labels, _ = original_sample(sp, instruction, context, answer, max_length=10**9)
        else:
            p, o = sp.encode(seed_prompt(instruction, context)), sp.encode(answer)
            one_ids, one_labels = [1, *p, 2, 1, *o, 2], [-100] * (len(p) + 3) + o + [2]
        ids += one_ids
        labels += one_labels if k == 0 else [-100] + one_labels[1:]
    return ids, labels


def chat(*pairs: tuple[str, str]) -> dict:
    """A messages record: user, assistant, user, assistant ..."""
    texts = [text for pair in pairs for text in pair]
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


# ---------------------------------------------------------------- generated conversations

GEN_WORDS = "what is an alpaca how different from a llama write the capital of tanzania summarise text 42 seed".split()
ODD = ["  ", "\n", " \n ", "\t", "Ｆｕｌｌ", "ﬁve", "café", "日本", "🦙", "x\u00a0y", "3.14", "a   b"]


def gen_text(rng: random.Random, lo: int = 1, hi: int = 6) -> str:
    parts = []
    for _ in range(rng.randint(lo, hi)):
        parts.append(rng.choice(ODD) if rng.random() < 0.15 else rng.choice(GEN_WORDS))
        parts.append(rng.choice([" ", " ", " ", "  ", "\n", " \n"]))
    return "".join(parts[:-1])


def gen_conversation(rng: random.Random, n_exchanges: int) -> dict:
    messages = []
    for _ in range(n_exchanges):
        content = rng.choice(["", " ", "\n"]) + rng.choice(GEN_WORDS) + " " + gen_text(rng)
        if rng.random() < 0.5:
            content += rng.choice([" ", "  ", "\n"]) + MARK + rng.choice([" ", "", "\n"]) + gen_text(rng)
        content += rng.choice(["", " ", "\n"])
        answer = rng.choice(["", " ", ""]) + rng.choice(GEN_WORDS) + " " + gen_text(rng) + rng.choice(["", "\n"])
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


CONVERSATIONS = [gen_conversation(random.Random(seed), 1 + seed % 4) for seed in range(24)]


@pytest.fixture(scope="module", params=["v1", "v2"])
def sp_folder(request, tmp_path_factory) -> Path:
    """A v1-like (NFKC, spaces folded) or v2-like (whitespace kept) OpenLLaMA tokenizer folder."""
    return train_sp_model(tmp_path_factory.mktemp("conv_tok") / request.param, request.param)


@pytest.fixture(scope="module")
def generated_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("conv_data") / "chats.jsonl", CONVERSATIONS)


def training_samples(folder: Path, path: Path, layout: str):
    """The trainer's reading and encoding of ``path`` (openalpaca.data, as train_sft.prepare does)."""
    from model.llama import load_tokenizer

    records = read_training_data(path, "auto", "refuse")
    return SFTDataset.from_records(records, load_tokenizer(folder), 10**6, FORMATS[layout]).samples


# ---------------------------------------------------------------- the tensors


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_conversation_tensors_are_the_layouts_samples_chained(sp_folder, generated_file, layout):
    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    samples = training_samples(sp_folder, generated_file, layout)
    assert len(samples) == len(CONVERSATIONS)
    for record, sample in zip(CONVERSATIONS, samples, strict=True):
        ids, labels = expected_sample(sp, record["messages"], layout)
        assert (sample.input_ids, sample.labels) == (ids, labels)
        hide = FORMATS[layout].hide_eos_keys
        assert sample.mask == ([int(i != 2) for i in ids] if hide else [1] * len(ids))
        # every answer is supervised, no user turn: the targets are the answers' (with the layout's bridge)
        bridge = [2, 1, 1] if layout == "original" else []
        answers = [m["content"] for m in record["messages"][1::2]]
        assert [x for x in labels[1:] if x != -100] == sum((bridge + sp.encode(a) + [2] for a in answers), [])


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_a_one_exchange_conversation_is_todays_sample(tokenizer, tmp_path, layout):
    """The same record as Alpaca JSON, as OpenAI messages and as ShareGPT: the same tensors."""
    alpaca = [{"instruction": "Repeat the words.", "input": "red plum fig", "output": "red plum fig"},
              {"instruction": "Name a fruit.", "input": "", "output": "apple"}]
    messages = [chat((f"{r['instruction']} {MARK} {r['input']}" if r["input"] else r["instruction"], r["output"]))
                for r in alpaca]
    sharegpt = [{"conversations": [{"from": "human", "value": m["messages"][0]["content"]},
                                   {"from": "gpt", "value": m["messages"][1]["content"]}]} for m in messages]
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    fmt = FORMATS[layout]
    today = [encode_sample(tokenizer, r["instruction"], r["input"], r["output"], 1024, fmt) for r in alpaca]
    for name, records in (("a.json", None), ("m.jsonl", messages), ("s.json", sharegpt)):
        if records is not None:
            (tmp_path / name).write_text(json.dumps(records) if name.endswith(".json") else
                                         "".join(json.dumps(r) + "\n" for r in records))
        assert SFTDataset.from_records(read_training_data(tmp_path / name), tokenizer, 1024, fmt).samples == today


def test_system_message_prepend_puts_it_before_the_first_instruction(tokenizer, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.folder / "tokenizer.model"))
    record = {"messages": [{"role": "system", "content": " Answer briefly. "},
                           *chat(("Repeat the words. ### Input: red fig", "red fig"), ("Name a fruit.", "apple"))[
                               "messages"]]}
    sharegpt = {"system": "Answer briefly.", "conversations": [
        {"from": "human", "value": "Repeat the words. ### Input: red fig"}, {"from": "gpt", "value": "red fig"},
        {"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "apple"}]}
    want, _ = expected_sample(sp, chat(("Answer briefly.\n\nRepeat the words. ### Input: red fig", "red fig"),
                                       ("Name a fruit.", "apple"))["messages"], "clean")
    for name, rec in (("m.jsonl", record), ("s.jsonl", sharegpt)):
        path = write_jsonl(tmp_path / name, [rec])
        with pytest.raises(DataError, match="system message"):
            read_training_data(path)
        sample = SFTDataset.from_records(read_training_data(path, system_message="prepend"), tokenizer, 1024,
                                         FORMATS["clean"]).samples[0]
        assert sample.input_ids == want


LONG = [("Repeat the words. ### Input: red plum fig", "red plum fig kiwi lime"),
        ("Name a fruit.", "apple"), ("Repeat the words. ### Input: one two", "one two three")]


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_keep_prompt_cuts_the_last_answer_or_drops_later_turns_and_keep_end_keeps_the_end(tokenizer, layout):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.folder / "tokenizer.model"))
    exchanges = [Exchange(*split_user(u), a) for u, a in LONG]
    full_ids, full_labels = expected_sample(sp, chat(*LONG)["messages"], layout)
    # where each exchange starts, and how long its unsupervised start is (bos, [bos,] prompt[, eos, bos])
    lengths = [len(expected_sample(sp, chat(pair)["messages"], layout)[0]) for pair in LONG]
    starts = [sum(lengths[:k]) for k in range(len(LONG))]
    head = [len(sp.encode(seed_prompt(*split_user(u)))) + (2 if layout == "original" else 3) for u, _ in LONG]
    keep_prompt = SampleFormat(layout, "keep_prompt", False)
    keep_end = SampleFormat(layout, "keep_end", False)

    def cut(n: int):
        s = encode_conversation(tokenizer, exchanges, n, keep_prompt)
        return None if s is None else (s.input_ids, s.labels)

    assert cut(len(full_ids)) == (full_ids, full_labels)
    # one token short: the last answer loses its eos, nothing else
    assert cut(len(full_ids) - 1) == (full_ids[:-1], full_labels[:-1])
    # room for the third exchange's prompt and one target: kept, cut there
    n = starts[2] + head[2] + 1
    assert cut(n) == (full_ids[:n], full_labels[:n])
    # no room for a target of the third exchange: it goes whole, the second ends complete with its eos
    for n in (starts[2] + head[2], starts[2] + 1):
        assert cut(n) == (full_ids[: starts[2]], full_labels[: starts[2]]), n
        assert full_ids[starts[2] - 1] == 2
    # the first prompt does not fit with one target: skipped
    assert cut(head[0]) is None and cut(head[0] + 1) == (full_ids[: head[0] + 1], full_labels[: head[0] + 1])
    for n in (len(full_ids) - 1, starts[2] + 3, 5):
        s = encode_conversation(tokenizer, exchanges, n, keep_end)
        assert (s.input_ids, s.labels, s.truncated) == (full_ids[-n:], full_labels[-n:], True)


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_an_inference_prompt_leaves_out_the_oldest_exchanges_whole_to_fit(tokenizer, layout):
    from openalpaca.generate import fitted_prompt_ids

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.folder / "tokenizer.model"))
    first, second = (expected_sample(sp, chat(pair)["messages"], layout)[0] for pair in LONG[:2])
    question = split_user(LONG[2][0])
    # the inference prompt: the sample up to its answer ([1, 1, P, 2, 1] or [1, P, 2, 1])
    prompt = expected_sample(sp, chat(LONG[2])["messages"], layout)[0][
        : len(sp.encode(seed_prompt(*question))) + (4 if layout == "original" else 3)]
    history = [Exchange(*split_user(u), a) for u, a in LONG[:2]]

    def fitted(n: int) -> list[int]:
        return fitted_prompt_ids(tokenizer, question, history, layout, max_prompt_tokens=n)

    assert fitted(10**6) == fitted(len(first + second + prompt)) == first + second + prompt
    for n in (len(first + second + prompt) - 1, len(second + prompt)):  # the oldest exchange goes, whole
        assert fitted(n) == second + prompt, n
    for n in (len(second + prompt) - 1, len(prompt)):
        assert fitted(n) == prompt, n
    assert fitted(len(prompt) - 2) == prompt[2:]  # a lone question keeps its last tokens (the seed's cut)


def test_a_conversation_that_cannot_start_is_skipped_and_counted(tokenizer):
    records = [tuple(Exchange(*split_user(u), a) for u, a in LONG), (Exchange("Name a fruit. " * 40, "", "x"),)]
    ds = SFTDataset.from_records(records, tokenizer, 200, FORMATS["clean"])  # fits the first two exchanges
    assert (len(ds), ds.num_skipped, ds.ids, ds.num_truncated) == (1, 1, [0], 1)


@pytest.mark.parametrize("weighting", ["sample", "token"])
def test_loss_weighting_a_conversation_is_one_sample_packed_or_not(models, tokenizer, weighting):
    """``sample``: a conversation's targets weigh 1 in all (the mean over all its answers' tokens, what
    the original's per-micro-batch mean would give); the packed loss and gradients equal transformers'
    own loss of each conversation alone, as for single records."""
    packed_model, seed_model = models
    rng = random.Random(5)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    records = [tuple(Exchange("Repeat the words.", words(rng.randint(1, 4)), words(rng.randint(1, 4)))
                     for _ in range(rng.randint(1, 3))) for _ in range(6)]
    samples = SFTDataset.from_records(records, tokenizer, 200, FORMATS["original"]).samples
    assert any(len(r) > 1 for r in records)
    batch = collate_packed(samples, weighting)
    if weighting == "sample":
        bounds = batch["cu_seq_lens_q"].tolist()
        assert [float(batch["weights"][0, a:b].sum()) for a, b in zip(bounds, bounds[1:], strict=False)] == \
            pytest.approx([1.0] * len(samples))
        assert collate(samples, "sample")["weights"].sum(1).tolist() == pytest.approx([1.0] * len(samples))
    assert_packed_step_equals_unpacked(packed_model, seed_model, samples, weighting)


# ---------------------------------------------------------------- the invariant users need


def saved_folder(sp_folder: Path, out: Path, layout: str) -> Path:
    """What the trainer writes next to its checkpoints (``save_model_metadata``): tokenizer.model, the
    exact tokenizer.json and the layout's chat template."""
    from model.llama import load_tokenizer, save_model_metadata

    class Config:
        def save_pretrained(self, dst):
            (Path(dst) / "config.json").write_text("{}")

    class Model:
        config = Config()

    out.mkdir(parents=True)
    save_model_metadata(Model(), load_tokenizer(sp_folder), out, layout)
    return out


def invariant_breaks(folder: Path, sp, records: list[dict], samples, layout: str) -> list[str]:
    """For every answer k of every conversation: the chat template on the turns before it (with the
    generation prompt), tokenised by AutoTokenizer from ``folder``, must be the training ids up to where
    answer k starts, and the training ids must go on with answer k; ``inference.py``'s prompt for that
    question (``prompt_ids`` with the earlier exchanges as history) must be the template's. Returns what
    breaks it."""
    from transformers import AutoTokenizer

    from model.llama import load_tokenizer
    from openalpaca.prompts import prompt_ids

    tok, ours = AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(folder)
    breaks = []
    for n, (record, sample) in enumerate(zip(records, samples, strict=True)):
        messages = record["messages"]
        history = []
        for k in range(len(messages) // 2):
            rendered = tok.apply_chat_template(messages[: 2 * k + 1], add_generation_prompt=True, tokenize=True)
            ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
            answer = ([1] if layout == "original" else []) + sp.encode(messages[2 * k + 1]["content"]) + [2]
            question = split_user(messages[2 * k]["content"])
            where = f"conversation {n + 1}, answer {k + 1}"
            if sample.input_ids[: len(ids)] != ids:
                breaks.append(f"{where}: the template's prompt is not the training ids")
            elif sample.input_ids[len(ids) : len(ids) + len(answer)] != answer:
                breaks.append(f"{where}: the training ids do not go on with the answer")
            elif prompt_ids(ours, *question, layout, history=history) != ids:
                breaks.append(f"{where}: inference's prompt is not the template's")
            history.append(Exchange(*question, messages[2 * k + 1]["content"]))
    return breaks


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_chat_template_on_the_earlier_turns_gives_the_training_ids(sp_folder, generated_file, tmp_path, layout):
    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    folder = saved_folder(sp_folder, tmp_path / "save", layout)
    samples = training_samples(folder, generated_file, layout)
    assert sum(len(r["messages"]) // 2 for r in CONVERSATIONS) >= 50
    assert invariant_breaks(folder, sp, CONVERSATIONS, samples, layout) == []


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_a_template_that_drops_a_bos_between_turns_breaks_the_invariant(sp_folder, generated_file, tmp_path, layout):
    """The invariant test is not vacuous: a template that starts later user turns without their bos fails it
    at every later answer, and only there."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    folder = saved_folder(sp_folder, tmp_path / "save", layout)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    extra = "{{- bos_token }}" if layout == "original" else ""
    user_bos = "    {{- bos_token }}" + extra + "\n"  # how a user turn starts
    assert config["chat_template"].count(user_bos) == 1
    config["chat_template"] = config["chat_template"].replace(
        user_bos, "    {%- if loop.first %}{{- bos_token }}{% endif %}" + extra + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    samples = training_samples(folder, generated_file, layout)
    breaks = invariant_breaks(folder, sp, CONVERSATIONS, samples, layout)
    later_answers = sum(len(r["messages"]) // 2 - 1 for r in CONVERSATIONS)
    assert len(breaks) == later_answers > 0 and not any("answer 1:" in b for b in breaks)


# ---------------------------------------------------------------- bad records: one line, file, record, turn

GOOD = chat(("Sort the words. ### Input: b a", "a b"), ("Upper case.", "A B"))


def msgs(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


BAD_RECORDS = [
    ("messages", msgs(("user", "a"), ("user", "b"), ("assistant", "c")),
     "line 2: turn 2: expected an assistant turn, got user; roles must alternate user, assistant, ... starting "
     "with the user"),
    ("messages", msgs(("assistant", "a"), ("user", "b")),
     "line 2: turn 1: expected a user turn, got assistant; roles must alternate user, assistant, ... starting "
     "with the user"),
    ("messages", msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
     "line 2: turn 3: the conversation ends with a user turn; the last turn must be the assistant's answer"),
    ("messages", msgs(("user", "a"), ("assistant", " \n ")), "line 2: turn 2: empty assistant turn"),
    ("messages", msgs(("user", ""), ("assistant", "b")), "line 2: turn 1: empty user turn"),
    ("messages", msgs(("user", "### Input: x"), ("assistant", "b")),
     "line 2: turn 1: the user turn has no instruction before '### Input:'"),
    ("messages", msgs(("system", "Be brief."), ("user", "a"), ("assistant", "b")),
     "line 2: turn 1: a system message, which the prompt layout has no slot for; remove it, or set "
     "system_message: prepend to put it before the first instruction"),
    ("messages", msgs(("user", "a"), ("assistant", "b"), ("system", "c"), ("assistant", "d")),
     "line 2: turn 3: expected a user turn, got system (a system message may only come first); roles must "
     "alternate user, assistant, ... starting with the user"),
    ("messages", msgs(("user", "a"), ("tool", "b")),
     "line 2: turn 2: 'role' must be one of system, user, assistant, got 'tool'"),
    ("messages", msgs(("user", "a"), ("assistant", 3)),
     "line 2: turn 2: 'content' must be a string or a list of text parts ({'type': 'text', 'text': ...}), got number"),
    ("messages", {"messages": []}, "line 2: field 'messages' is empty"),
    ("messages", {"conversations": []}, "line 2: missing field 'messages'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     "line 2: turn 2: 'from' must be one of system, human, gpt, got 'bot'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
     "line 2: turn 2: empty assistant turn"),
    ("sharegpt", {"system": "Be brief.", "conversations": [{"from": "human", "value": "a"},
                                                           {"from": "gpt", "value": "b"}]},
     "line 2: field 'system': a system message, which the prompt layout has no slot for; remove it, or set "
     "system_message: prepend to put it before the first instruction"),
]


@pytest.mark.parametrize("fmt, bad, message", BAD_RECORDS, ids=[m[8:60] for _, _, m in BAD_RECORDS])
def test_bad_records_are_one_line_naming_file_record_and_turn(tmp_path, fmt, bad, message):
    first = GOOD if fmt == "messages" else {"conversations": [{"from": "human", "value": "a"},
                                                              {"from": "gpt", "value": "b"}]}
    path = write_jsonl(tmp_path / "chats.jsonl", [first, bad])
    with pytest.raises(DataError) as err:
        read_conversations(path)
    assert str(err.value) == f"{path}: {message}"
    assert "\n" not in str(err.value)


def test_a_file_is_one_format_and_auto_says_when_it_cannot_tell(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD, {"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(DataError, match=r"mixed.jsonl: line 2: missing field 'messages'$"):
        read_conversations(path)
    (tmp_path / "odd.json").write_text(json.dumps([{"prompt": "a", "completion": "b"}]))
    with pytest.raises(DataError, match=r"odd.json: record 1: cannot tell the data format: expected a field "
                                        r"'instruction' \(alpaca\), 'messages' \(OpenAI messages\) or 'conversations' "
                                        r"\(ShareGPT\); or set data_format"):
        read_conversations(tmp_path / "odd.json")
    # a named format reads the file as that format
    with pytest.raises(DataError, match=r"line 1: missing field 'conversations'"):
        read_conversations(write_jsonl(tmp_path / "m.jsonl", [GOOD]), "sharegpt")
    assert read_conversations(tmp_path / "m.jsonl", "messages")[0] == "messages"


def test_several_files_each_with_its_own_format(tmp_path):
    """``data_path: a.json,chats.jsonl``: the records one after the other; an error names its file."""
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": " Name a fruit.", "input": "", "output": "apple"}]))
    chats = write_jsonl(tmp_path / "chats.jsonl", [GOOD])
    records = read_training_data(f"{tmp_path / 'a.json'}, {chats}")
    assert records == [(Exchange(" Name a fruit.", "", "apple"),),
                       (Exchange("Sort the words.", "b a", "a b"), Exchange("Upper case.", "", "A B"))]
    bad = write_jsonl(tmp_path / "bad.jsonl", [msgs(("user", "a"))])
    with pytest.raises(DataError, match=rf"^{bad}: line 1: turn 1: the conversation ends with a user turn"):
        read_training_data(f"{chats},{bad}")


def test_the_trainer_refuses_a_bad_conversation_before_loading_anything(tiny_model_dir, tmp_path, monkeypatch):
    """train_sft.prepare (the checks before any model is built): the bad record's line, and no tokenizer loaded."""
    import train_sft
    from openalpaca.config import TrainConfig

    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD, msgs(("user", "a"), ("assistant", "b"), ("user", "c"))])
    cfg = TrainConfig(model_path=str(tiny_model_dir), data_path=str(path), save_path=str(tmp_path / "out"),
                      ds_config=str(REPO / "dsconfig" / "openllama.json"))
    monkeypatch.setattr(train_sft, "load_tokenizer", lambda *a: pytest.fail("the tokenizer was loaded"))
    with pytest.raises(DataError, match=r"chats.jsonl: line 2: turn 3: the conversation ends with a user turn"):
        train_sft.prepare(cfg, 1)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_sft_command_prints_the_one_line(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD, msgs(("user", "a"), ("user", "b"))])
    proc = run(["python", "train_sft.py", "--model_path", str(tiny_model_dir), "--data_path", str(path),
                "--save_path", str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {path}: line 2: turn 2: expected an assistant turn, got user; roles must alternate user, "
        f"assistant, ... starting with the user"]


def test_config_keys_are_checked(tmp_path):
    from openalpaca.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data_format must be one of auto, alpaca, messages, sharegpt, got 'csv'"):
        load_config(["--data_format", "csv"])
    with pytest.raises(ConfigError, match="system_message must be one of refuse, prepend, got 'merge'"):
        load_config(["--system_message", "merge"])
    cfg = load_config(["--data_format", "sharegpt", "--system_message", "prepend"])
    assert (cfg.data_format, cfg.system_message) == ("sharegpt", "prepend")


# ---------------------------------------------------------------- process_dataset.py


def test_process_dataset_checks_and_writes_conversations_as_messages(tokenizer, tmp_path, capsys):
    import process_dataset

    sharegpt = [{"conversations": [{"from": "human", "value": "  Sort the words.\n### Input:  b a "},
                                   {"from": "gpt", "value": "a b"}, {"from": "human", "value": "Upper case."},
                                   {"from": "gpt", "value": "A B"}]},
                {"conversations": [{"from": "human", "value": "Long. ### Input: " + "w " * 30},
                                   {"from": "gpt", "value": "x"}]}]
    src, out = write_jsonl(tmp_path / "s.jsonl", sharegpt), tmp_path / "out.json"
    assert process_dataset.main(["--input", str(src), "--output", str(out), "--max_words", "20"]) == 0
    assert capsys.readouterr().out.strip() == (f"read 2 conversations (sharegpt) from {src}; kept 1, dropped 1 "
                                               f"longer than 20 words; wrote {out}")
    written = json.loads(out.read_text())
    assert written == [chat(("Sort the words. ### Input: b a", "a b"), ("Upper case.", "A B"))]
    fmt = FORMATS["clean"]
    assert SFTDataset.from_records(read_training_data(out), tokenizer, 1024, fmt).samples == \
        SFTDataset.from_records(read_training_data(src), tokenizer, 1024, fmt).samples[:1]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "a"}]}])
    assert process_dataset.main(["--input", str(bad), "--output", str(tmp_path / "o.json")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {bad}: line 1: turn 1: the conversation ends with a user "
                                               f"turn; the last turn must be the assistant's answer")
    assert not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------- the benchmarks' conversation path


def test_peers_feeds_trl_every_answer_and_scores_every_answer(tokenizer, tiny_model_dir):
    """bench/peers.py --conversations: TRL's completion mask covers exactly the answers and their eos
    (written out here), and the held-out loss of a conversation is the mean over its answers, each
    scored after the earlier turns as inference feeds them."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import peers
    from transformers import LlamaForCausalLM

    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    records = [chat(("Repeat the words. ### Input: red plum", "red plum"), ("Name a fruit.", "apple")),
               {"instruction": "Name a fruit.", "input": "", "output": "pear"}]
    rows = peers.trl_rows(records, tokenizer, 1024)
    ids, _ = expected_sample(sp, records[0]["messages"], "clean")
    assert rows[0]["input_ids"] == ids
    masked = [i for i, m in zip(rows[0]["input_ids"], rows[0]["completion_mask"], strict=True) if m]
    assert masked == sp.encode("red plum") + [2] + sp.encode("apple") + [2]

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    for layout in ("clean", "original"):
        ce, count = 0.0, 0
        history: list[list[int]] = []
        with torch.no_grad():
            for k in range(2):
                user, answer = records[0]["messages"][2 * k]["content"], records[0]["messages"][2 * k + 1]["content"]
                bos = [1, 1] if layout == "original" else [1]
                context = sum(history, []) + bos + sp.encode(seed_prompt(*split_user(user))) + [2, 1]
                context += [1] if layout == "original" else []
                target = sp.encode(answer) + [2]
                logits = model(input_ids=torch.tensor([context + target])).logits[0, len(context) - 1:-1]
                ce += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
                count += len(target)
                history.append(context + target)
        assert peers.heldout_loss(tiny_model_dir, layout, records[:1], tokenizer) == pytest.approx(ce / count,
                                                                                                  rel=1e-5)
