"""inference.py in each mode on the tiny model, and the prompt it feeds the model."""

import json
import sys

import pytest
import torch

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


def test_left_padded_batches_give_the_same_greedy_answers(model, tokenizer):
    greedy = Sampling(max_new_tokens=6, greedy=True)
    one_by_one = [generate(model, tokenizer, [q], greedy, batch_size=1)[0] for q in QUESTIONS]
    assert generate(model, tokenizer, QUESTIONS, greedy, batch_size=3) == one_by_one


def test_sampling_is_reproducible_with_a_seed(model, tokenizer):
    answers = []
    for _ in range(2):
        torch.manual_seed(3)
        answers.append(generate(model, tokenizer, QUESTIONS, Sampling(max_new_tokens=8), batch_size=2))
    assert answers[0] == answers[1]


def test_single_prompt_mode(tiny_model_dir, model, tokenizer):
    proc = run([sys.executable, "inference.py", "--model_path", str(tiny_model_dir), "--instruction",
                "Repeat the words.", "--input", "red plum fig", "--greedy", "--max_new_tokens", "6"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = generate(model, tokenizer, [QUESTIONS[1]], Sampling(max_new_tokens=6, greedy=True))[0]
    assert proc.stdout.splitlines()[-1] == expected


def test_file_mode_writes_jsonl_with_generated(tiny_model_dir, model, tokenizer, tmp_path):
    src = tmp_path / "q.json"
    src.write_text(json.dumps([{"instruction": i, "input": c, "id": n} for n, (i, c) in enumerate(QUESTIONS)]))
    out = tmp_path / "a.jsonl"
    proc = run([sys.executable, "inference.py", "--model_path", str(tiny_model_dir), "--input_file", str(src),
                "--output_file", str(out), "--greedy", "--max_new_tokens", "6", "--batch_size", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert [r["generated"] for r in rows] == generate(model, tokenizer, QUESTIONS, Sampling(6, greedy=True))


def test_interactive_mode_streams_and_exits_on_empty_line(tiny_model_dir):
    proc = run([sys.executable, "inference.py", "--model_path", str(tiny_model_dir), "--interactive", "--greedy",
                "--max_new_tokens", "4"], timeout=120, input="Name a fruit.\n\nNever read.\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("### Instruction:") == 2  # asked twice: one answer, then the empty line quits


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_path", "./no_model", "--instruction", "x"], "no_model: model folder not found"),
        (["--input_file", "{tmp}/bad.jsonl", "--output_file", "{tmp}/o.jsonl"], "line 2: field 'instruction'"),
        (["--input_file", "{tmp}/bad.jsonl", "--output_file", "{tmp}/none/o.jsonl"], "line 2: field 'instruction'"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_model_dir, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a"}\n{"instruction": 3}\n')
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run([sys.executable, "inference.py", "--model_path", str(tiny_model_dir), *args], timeout=120)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
