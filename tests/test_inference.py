"""inference.py in each mode on the tiny model, and the prompt it feeds the model."""

import json
import shutil
import sys

import pytest
import torch
import yaml

from model.llama import load_model
from openalpaca.generate import Sampling, generate
from openalpaca.prompts import prompt_ids
from tests.conftest import run

QUESTIONS = [("Name a fruit.", ""), ("Repeat the words.", "red plum fig"), ("Repeat the words.", "one")]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, "fp32")


def test_generate_feeds_exactly_the_training_prefix(model, tokenizer, monkeypatch):
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["input_ids"][0].tolist()) or real(**kw))
    generate(model, tokenizer, [QUESTIONS[1]], Sampling(max_new_tokens=2, greedy=True), batch_size=1)
    assert seen == [prompt_ids(tokenizer, *QUESTIONS[1])]


def seed_snippet_ids(sp, instruction: str, input: str) -> list[int]:
    """The seed README's snippet, written out: [bos] + LlamaTokenizer.encode(prompt) + [eos] + [bos]."""
    prompt = (f"### Input:\n{input}\n\n### Instruction:\n{instruction}\n\n### Response:" if input
              else f"### Instruction:\n{instruction}\n\n### Response:")
    return ([1] + ([1] + sp.encode(prompt)) + [2] + [1])[-1024:]


@pytest.mark.parametrize("record", [None, "original", "clean"])
def test_inference_py_prompts_in_the_layout_recorded_next_to_the_checkpoint(tiny_model_dir, model, tokenizer, tmp_path,
                                                                          monkeypatch, capsys, record):
    """No record (the published checkpoints): exactly the snippet's ids, and its output cleaning."""
    import sentencepiece as spm

    import inference

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if record:
        (folder / "train_config.yaml").write_text(yaml.safe_dump({"layout": record, "dtype": "fp32"}))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    answer = sp.encode("red plum")
    seen = []

    def fake_generate(input_ids, **kwargs):
        seen.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([[1, *answer, 2]])], dim=1)  # the original layout's bos first

    monkeypatch.setattr(model, "generate", fake_generate)
    monkeypatch.setattr(inference, "load", lambda args: (model, tokenizer))
    assert inference.main(["--model_path", str(folder), "--instruction", QUESTIONS[1][0], "--input", QUESTIONS[1][1],
                           "--greedy"]) == 0
    snippet = seed_snippet_ids(sp, *QUESTIONS[1])
    assert seen == [snippet if record in (None, "original") else snippet[1:]]
    # the snippet: decode with special tokens kept, drop <s> and </s>, strip
    assert capsys.readouterr().out.splitlines()[-1] == sp.decode(answer).strip()


def test_left_padded_batches_give_the_same_greedy_answers(copy_model, copy_tokenizer):
    """On the prompt-sensitive model (the random one answers alike whatever it attends to): one
    batch of six prompts of different lengths, left-padded, answers as each prompt alone."""
    greedy = Sampling(max_new_tokens=NEW, greedy=True)
    one_by_one = [generate(copy_model, copy_tokenizer, [q], greedy, batch_size=1)[0] for q in COPY_QUESTIONS]
    assert len({len(prompt_ids(copy_tokenizer, *q)) for q in COPY_QUESTIONS}) > 1  # padding happens
    assert generate(copy_model, copy_tokenizer, COPY_QUESTIONS, greedy, batch_size=len(COPY_QUESTIONS)) == one_by_one


def test_sampling_is_reproducible_with_a_seed(model, tokenizer):
    answers = []
    for _ in range(2):
        torch.manual_seed(3)
        answers.append(generate(model, tokenizer, QUESTIONS, Sampling(max_new_tokens=8), batch_size=2))
    assert answers[0] == answers[1]


# ---------------------------------------------------------------- a model whose answer depends on the prompt
#
# copy_model_dir (tests/conftest.py) repeats the input's words or says the first one, and records
# layout: clean. Every mode of inference.py is checked against answers computed here one prompt at a
# time, without padding or a KV cache, from prompt ids written out with sentencepiece.

COPY_QUESTIONS = [("Repeat the words.", "red plum fig"), ("Say the first word.", "one two three"),
                  ("Repeat the words.", "kiwi"), ("Say the first word.", "green mango"),
                  ("Repeat the words.", "blue lime date white"), ("Say the first word.", "")]
NEW = 8  # max_new_tokens


@pytest.fixture(scope="module")
def copy_model(copy_model_dir):
    return load_model(copy_model_dir, "fp32")


@pytest.fixture(scope="module")
def copy_tokenizer(copy_model_dir):
    from model.llama import load_tokenizer

    return load_tokenizer(copy_model_dir)


def clean_ids(sp, instruction: str, input: str) -> list[int]:
    """The clean layout's inference prompt, written out: [1] + sp(prompt) + [2, 1]."""
    text = (f"### Input:\n{input}\n\n### Instruction:\n{instruction}\n\n### Response:" if input
            else f"### Instruction:\n{instruction}\n\n### Response:")
    return [1, *sp.encode(text), 2, 1]


@torch.no_grad()
def greedy_answer(model, sp, ids: list[int], new: int = NEW) -> str:
    """Greedy decoding one token at a time on the whole unpadded sequence (no cache, no mask)."""
    out: list[int] = []
    for _ in range(new):
        token = model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax().item()
        if token == 2:
            break
        out.append(token)
    return sp.decode(out).strip()


@pytest.fixture(scope="module")
def expected(copy_model, sp):
    return {q: greedy_answer(copy_model, sp, clean_ids(sp, *q)) for q in COPY_QUESTIONS}


def test_copy_model_answers_depend_on_the_prompt(copy_model, sp, expected):
    """The premise of the tests below: a different prompt gives a different answer."""
    with_input = [q for q in COPY_QUESTIONS if q[1]]
    assert len({expected[q] for q in with_input}) == len(with_input), expected
    # instruction and input swapped: another answer (the single-mode test asks this question)
    instruction, input = COPY_QUESTIONS[0]
    assert greedy_answer(copy_model, sp, clean_ids(sp, input, instruction)) != expected[instruction, input]
    # it learned its task: the input repeated, or the input's first word
    assert expected["Repeat the words.", "red plum fig"] == "red plum fig"
    assert expected["Say the first word.", "one two three"] == "one"


@pytest.fixture()
def spy(copy_model, copy_tokenizer, monkeypatch):
    """inference.main on the copy model, with every model.generate call's arguments recorded."""
    import inference

    calls = []
    real = copy_model.generate

    def generate(**kwargs):
        calls.append({k: v.tolist() if torch.is_tensor(v) else v for k, v in kwargs.items() if k != "streamer"})
        return real(**kwargs)

    monkeypatch.setattr(copy_model, "generate", generate)
    monkeypatch.setattr(inference, "load", lambda args: (copy_model, copy_tokenizer))
    return calls


GREEDY = {"max_new_tokens": NEW, "do_sample": False, "num_beams": 1}


@pytest.mark.parametrize("question", [COPY_QUESTIONS[0], COPY_QUESTIONS[5]], ids=["with_input", "no_input"])
def test_single_mode_answers_and_feeds_the_prompt(copy_model_dir, sp, expected, spy, capsys, question):
    import inference

    flags = ["--input", question[1]] if question[1] else []
    assert inference.main(["--model_path", str(copy_model_dir), "--instruction", question[0], *flags, "--greedy",
                           "--max_new_tokens", str(NEW)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == expected[question]
    ids = clean_ids(sp, *question)
    assert [(c["input_ids"], c["attention_mask"]) for c in spy] == [([ids], [[1] * len(ids)])]
    assert {k: spy[0][k] for k in GREEDY} == GREEDY


def test_file_mode_left_pads_a_batch_and_answers_each_record(copy_model_dir, sp, expected, spy, tmp_path):
    """Five records of different lengths (one without an input field) in batches of 3: each batch
    left-padded with 0 and masked; each answer equals its one-at-a-time answer."""
    import inference

    records = [{"instruction": i, **({"input": c} if c else {}), "id": n} for n, (i, c) in enumerate(COPY_QUESTIONS)]
    src, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert inference.main(["--model_path", str(copy_model_dir), "--input_file", str(src), "--output_file", str(out),
                           "--greedy", "--max_new_tokens", str(NEW), "--batch_size", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(COPY_QUESTIONS)))
    assert [r["generated"] for r in rows] == [expected[q] for q in COPY_QUESTIONS]
    # the batches: shortest prompts first, 3 at a time, right-aligned behind 0s with mask 0
    prompts = sorted((clean_ids(sp, *q) for q in COPY_QUESTIONS), key=len)
    want = []
    for chunk in (prompts[:3], prompts[3:]):
        width = max(map(len, chunk))
        want.append(([[0] * (width - len(p)) + p for p in chunk],
                     [[0] * (width - len(p)) + [1] * len(p) for p in chunk]))
    assert [(c["input_ids"], c["attention_mask"]) for c in spy] == want
    assert any(0 in row for ids, _ in want for row in ids)  # some row really is padded


def test_plain_transformers_with_the_folders_chat_template_answers_as_inference_py(copy_model_dir, expected, tmp_path):
    """A user's own script: AutoTokenizer, the folder's chat template, generate. The folder has the
    files the trainer and the exporters write (exact tokenizer.json, chat template, generation_config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import inference

    src, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"instruction": i, "input": c}) + "\n" for i, c in COPY_QUESTIONS))
    assert inference.main(["--model_path", str(copy_model_dir), "--input_file", str(src), "--output_file", str(out),
                           "--greedy", "--max_new_tokens", str(NEW)]) == 0
    theirs = [json.loads(line)["generated"] for line in out.read_text().splitlines()]

    tok = AutoTokenizer.from_pretrained(str(copy_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(copy_model_dir))
    plain = []
    for instruction, context in COPY_QUESTIONS:
        content = f"{instruction} ### Input: {context}" if context else instruction
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        new = model.generate(input_ids=ids, do_sample=False, max_new_tokens=NEW)[0, ids.shape[1]:]
        plain.append(tok.decode(new, skip_special_tokens=True).strip())
    assert plain == theirs == [expected[q] for q in COPY_QUESTIONS]


def conversation_ids(sp, history: list[tuple[str, str, str]], question: tuple[str, str]) -> list[int]:
    """The clean layout's prompt after earlier exchanges, written out: each exchange's training
    sample [1] + sp(prompt) + [2, 1] + sp(answer) + [2], then the question's prompt."""
    ids = []
    for instruction, input, answer in history:
        ids += clean_ids(sp, instruction, input) + sp.encode(answer) + [2]
    return ids + clean_ids(sp, *question)


def test_interactive_mode_keeps_the_conversation_streams_and_takes_an_input(copy_model_dir, sp, expected, spy,
                                                                            capsys, monkeypatch):
    """'INSTRUCTION ### Input: CONTEXT' gives a context; a bare line is an instruction alone; each
    question is asked after the conversation so far (its answers as generated); /reset starts a
    new one; the empty line quits (the line after it is never read)."""
    import io

    import inference

    lines = ["Repeat the words. ### Input: red plum fig", "Say the first word. ### Input:  one two three ",
             "/reset", "Say the first word.", "Repeat the words. ### Input: kiwi", "",
             "Repeat the words. ### Input: kiwi"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    assert inference.main(["--model_path", str(copy_model_dir), "--interactive", "--greedy",
                           "--max_new_tokens", str(NEW)]) == 0
    out = capsys.readouterr().out
    asked = [COPY_QUESTIONS[0], COPY_QUESTIONS[1], COPY_QUESTIONS[5], COPY_QUESTIONS[2]]
    streamed = [text.strip() for text in out.split("### Instruction: ")[1:]]
    assert len(streamed) == 6  # four questions, /reset, then the empty line
    assert streamed[2] == "(a new conversation)"
    answers = streamed[:2] + streamed[3:5]
    assert answers[0] == expected[COPY_QUESTIONS[0]]  # a first question is asked alone
    histories = [[], [(*asked[0], answers[0])], [], [(*asked[2], answers[2])]]
    assert [c["input_ids"] for c in spy] == [[conversation_ids(sp, h, q)] for h, q in zip(histories, asked,
                                                                                          strict=True)]
    assert inference.split_user_content("Summarise. ### Input: a ### Input: b") == ("Summarise.", "a ### Input: b")


def test_seeded_sampling_is_reproducible_and_the_seed_matters(copy_model_dir, spy, tmp_path, capsys):
    import inference

    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"instruction": i, "input": c}) + "\n" for i, c in COPY_QUESTIONS))

    def sample(seed: int) -> list[str]:
        out = tmp_path / f"a{seed}.jsonl"
        assert inference.main(["--model_path", str(copy_model_dir), "--input_file", str(src), "--output_file",
                               str(out), "--seed", str(seed), "--temperature", "3", "--top_k", "40", "--top_p",
                               "0.95", "--max_new_tokens", str(NEW), "--batch_size", "2"]) == 0
        return [json.loads(line)["generated"] for line in out.read_text().splitlines()]

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    assert {k: spy[0][k] for k in ("do_sample", "temperature", "top_k", "top_p")} == \
        {"do_sample": True, "temperature": 3.0, "top_k": 40, "top_p": 0.95}


@torch.no_grad()
def test_seeded_sampling_equals_sampling_written_out(copy_model_dir, copy_model, sp, spy, capsys):
    """One prompt, seed 7: the seed's recipe written out (temperature, then top-k, then top-p,
    then one torch.multinomial draw per token from the seeded generator) gives the same answer."""
    import inference

    question, temperature, top_k, top_p = COPY_QUESTIONS[0], 2.0, 20, 0.9
    assert inference.main(["--model_path", str(copy_model_dir), "--instruction", question[0], "--input", question[1],
                           "--seed", "7", "--temperature", str(temperature), "--top_k", str(top_k), "--top_p",
                           str(top_p), "--max_new_tokens", str(NEW)]) == 0
    got = capsys.readouterr().out.splitlines()[-1]
    torch.manual_seed(7)
    ids, out = clean_ids(sp, *question), []
    for _ in range(NEW):
        scores = copy_model(input_ids=torch.tensor([ids + out])).logits[0, -1] / temperature
        scores[scores < scores.topk(top_k).values[-1]] = -float("inf")
        sorted_scores, order = scores.sort()  # ascending, as transformers' top-p
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False
        scores[order[drop]] = -float("inf")
        token = torch.multinomial(scores.softmax(-1), num_samples=1).item()
        if token == 2:
            break
        out.append(token)
    assert got == sp.decode(out).strip()


@pytest.mark.slow
def test_command_line_modes_on_the_copy_model(copy_model_dir, sp, expected, tmp_path):
    """The real command, as a user runs it: single with --input, file mode with a padded batch,
    interactive with a context line (the answer streamed to stdout)."""
    base = [sys.executable, "inference.py", "--model_path", str(copy_model_dir), "--greedy", "--max_new_tokens",
            str(NEW)]
    proc = run([*base, "--instruction", COPY_QUESTIONS[0][0], "--input", COPY_QUESTIONS[0][1]], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == expected[COPY_QUESTIONS[0]]

    src, out = tmp_path / "q.json", tmp_path / "a.jsonl"
    src.write_text(json.dumps([{"instruction": i, "input": c} for i, c in COPY_QUESTIONS]))
    proc = run([*base, "--input_file", str(src), "--output_file", str(out), "--batch_size", "4"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line)["generated"] for line in out.read_text().splitlines()] == \
        [expected[q] for q in COPY_QUESTIONS]

    proc = run([*base, "--interactive"], timeout=120,
               input="Say the first word. ### Input: green mango\n\nRepeat the words.\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = proc.stdout.split("### Instruction: ")[1:]
    assert len(answers) == 2 and answers[0].strip() == expected[COPY_QUESTIONS[3]]


BAD_INPUT = [
    (["--model_path", "./no_model", "--instruction", "x"],
     "./no_model: model folder not found (see openllama_ckpt/README.md)"),
    (["--input_file", "{tmp}/bad.jsonl", "--output_file", "{tmp}/o.jsonl"],
     "{tmp}/bad.jsonl: line 2: field 'instruction' must be a string, got number"),
    (["--input_file", "{tmp}/no.jsonl", "--output_file", "{tmp}/o.jsonl"], "{tmp}/no.jsonl: no such file"),
    (["--input_file", "{tmp}/good.jsonl", "--output_file", "{tmp}/none/o.jsonl"],
     "{tmp}/none/o.jsonl: output directory {tmp}/none does not exist"),
    # a parent that is a regular file: unwritable for root too
    (["--input_file", "{tmp}/good.jsonl", "--output_file", "{tmp}/afile/o.jsonl"],
     "{tmp}/afile/o.jsonl: output directory {tmp}/afile is not a directory"),
    (["--input_file", "{tmp}/good.jsonl", "--output_file", "{tmp}"], "{tmp}: output path is a directory"),
    (["--input_file", "{tmp}/good.jsonl"], "--input_file needs --output_file"),
    (["--instruction", "x", "--output_file", "{tmp}/o.jsonl"], "--output_file needs --input_file"),
    (["--instruction", "x", "--interactive"], "give exactly one of --instruction, --interactive, --input_file"),
    (["--interactive", "--input", "ctx"], "--input goes with --instruction (a file's records carry their own; "
                                          "interactive: 'INSTRUCTION ### Input: CONTEXT')"),
    (["--instruction", "x", "--top_k", "many"], "argument --top_k: invalid int value: 'many'"),
    (["--instruction", "x", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
    (["--instruction", "x", "--temperature", "0"], "--temperature must be greater than 0, got 0.0"),
    (["--instruction", "x", "--top_p", "1.5"], "--top_p must be at most 1, got 1.5"),
    (["--input_file", "{tmp}/good.jsonl", "--output_file", "{tmp}/o.jsonl", "--batch_size", "0"],
     "--batch_size must be at least 1, got 0"),
    (["--instruction", "x", "--bogus"], "unrecognized arguments: --bogus"),
]


def bad_input_files(tmp_path) -> list[str]:
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a"}\n{"instruction": 3}\n')
    (tmp_path / "good.jsonl").write_text('{"instruction": "a"}\n')
    (tmp_path / "afile").write_text("a regular file\n")
    return sorted(p.name for p in tmp_path.iterdir())


def assert_nothing_written(tmp_path, before: list[str]) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no o.jsonl, no none/, no temp file
    assert (tmp_path / "afile").read_text() == "a regular file\n"


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[m[:40] for _, m in BAD_INPUT])
def test_bad_input_is_one_line_exit_1_and_nothing_written(tiny_model_dir, tmp_path, capsys, args, message):
    """Exactly one line on stderr (no usage block, no traceback), exit status 1, nothing on stdout,
    and no output file or folder left behind (in-process; the command itself: the test below)."""
    import inference

    before = bad_input_files(tmp_path)
    assert inference.main(["--model_path", str(tiny_model_dir), *[a.format(tmp=tmp_path) for a in args]]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"error: {message.format(tmp=tmp_path)}"] and out == ""
    assert_nothing_written(tmp_path, before)


@pytest.mark.slow
@pytest.mark.parametrize("case", [0, 1, 4, 10])
def test_bad_input_command_prints_one_line_only(tiny_model_dir, tmp_path, case):
    """As a user runs it: nothing else reaches stderr (no import-time warning either)."""
    args, message = BAD_INPUT[case]
    before = bad_input_files(tmp_path)
    proc = run([sys.executable, "inference.py", "--model_path", str(tiny_model_dir),
                *[a.format(tmp=tmp_path) for a in args]], timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: {message.format(tmp=tmp_path)}"] and proc.stdout == ""
    assert_nothing_written(tmp_path, before)
