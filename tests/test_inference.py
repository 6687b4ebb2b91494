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


@pytest.mark.slow
def test_single_prompt_mode(tiny_model_dir, model, tokenizer):
    proc = run([sys.executable, "inference.py", "--model_path", str(tiny_model_dir), "--instruction",
                "Repeat the words.", "--input", "red plum fig", "--greedy", "--max_new_tokens", "6"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # no train_config.yaml in the folder: the published checkpoints' (original) layout
    expected = generate(model, tokenizer, [QUESTIONS[1]], Sampling(max_new_tokens=6, greedy=True), layout="original")[0]
    assert proc.stdout.splitlines()[-1] == expected


@pytest.mark.slow
def test_file_mode_writes_jsonl_with_generated(tiny_model_dir, model, tokenizer, tmp_path):
    src = tmp_path / "q.json"
    src.write_text(json.dumps([{"instruction": i, "input": c, "id": n} for n, (i, c) in enumerate(QUESTIONS)]))
    out = tmp_path / "a.jsonl"
    proc = run([sys.executable, "inference.py", "--model_path", str(tiny_model_dir), "--input_file", str(src),
                "--output_file", str(out), "--greedy", "--max_new_tokens", "6", "--batch_size", "2"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert [r["generated"] for r in rows] == generate(model, tokenizer, QUESTIONS, Sampling(6, greedy=True),
                                                      layout="original")


@pytest.mark.slow
def test_interactive_mode_streams_and_exits_on_empty_line(tiny_model_dir):
    proc = run([sys.executable, "inference.py", "--model_path", str(tiny_model_dir), "--interactive", "--greedy",
                "--max_new_tokens", "4"], timeout=120, input="Name a fruit.\n\nNever read.\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("### Instruction:") == 2  # asked twice: one answer, then the empty line quits


@pytest.mark.slow
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
