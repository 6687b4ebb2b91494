"""Shared fixtures: a tokenizer and a tiny random LLaMA the tests make themselves."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORDS = "apple pear plum fig kiwi lime date mango grape melon red blue green black white one two three".split()


def make_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Alpaca records of a learnable task: repeat the input's words, or name a fixed fruit."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        if i % 3 == 0:
            records.append({"instruction": "Name a fruit.", "input": "", "output": "apple"})
        else:
            records.append({"instruction": "Repeat the words.", "input": " ".join(words), "output": " ".join(words)})
    return records


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA HF folder shaped like openllama_ckpt/ (tokenizer.model, config, weights)."""
    from demo.tiny import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny_llama")
    texts = [" ".join(WORDS)] * 4 + [json.dumps(r) for r in make_records(50)]
    make_tiny_checkpoint(out, texts, vocab_size=300, hidden_size=32, num_layers=2, num_heads=4)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from model.llama import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture()
def alpaca_file(tmp_path) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(make_records(48)))
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago (for a launcher's --master_port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The environment a user's shell would give: no PYTHONPATH, CPU DeepSpeed, this Python."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    return env


def run(cmd: list[str], timeout: int = 300, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a repo command from the repository root, as a user would.

    On a timeout the whole process group goes (the DeepSpeed launcher's ranks too: left running,
    they would slow every later test) and the test fails with the command's last output.
    """
    with subprocess.Popen(cmd, cwd=REPO, env={**clean_env(), **(env or {})}, text=True, start_new_session=True,
                          stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n"
                        f"--- stdout (end) ---\n{out[-3000:]}\n--- stderr (end) ---\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def samples(tokenizer):
    """Eight real samples of different lengths (the tiny tokenizer's Alpaca layout)."""
    from openalpaca.data import SFTDataset

    return SFTDataset.from_records(make_records(8, seed=3), tokenizer, max_length=64).samples


@pytest.fixture(scope="session")
def models(tiny_model_dir):
    """The same tiny LLaMA twice: with the packed attention and with transformers' sdpa."""
    from model.attention import register_packed_attention
    from model.llama import load_model

    packed = load_model(tiny_model_dir, "fp32", attn_implementation=register_packed_attention())
    seed = load_model(tiny_model_dir, "fp32", attn_implementation="sdpa")
    return packed, seed


@pytest.fixture(scope="session")
def sp(copy_model_dir):
    """The copy model's sentencepiece tokenizer, which expected ids are written with."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(copy_model_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def client(served):
    """An OpenAI client of the module's server (its ``served`` fixture gives the URL and the API key)."""
    from openai import OpenAI

    return OpenAI(base_url=served["url"], api_key=served["key"], max_retries=0, timeout=60)


COPY_TASKS = {"Repeat the words.": lambda words: words, "Say the first word.": lambda words: words[:1]}


@pytest.fixture(scope="session")
def copy_model_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA whose answer depends on the prompt: trained here (plain torch, a few seconds,
    clean layout) to repeat the input's words or to say its first word.

    The random ``tiny_model_dir`` answers the same text whatever the prompt, so it cannot tell a
    swapped instruction and input, a wrong prompt or broken left padding from the real thing.
    Its folder records ``layout: clean`` (``train_config.yaml``) and has the exact
    ``tokenizer.json`` and the clean chat template, as the trainer's checkpoints do.
    """
    import sentencepiece as spm
    import torch
    import yaml
    from transformers import LlamaForCausalLM

    from demo.tiny import llama_config, train_tokenizer
    from model.hf_tokenizer import write_hf_tokenizer
    from model.llama import generation_config
    from openalpaca.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, build_prompt

    out = tmp_path_factory.mktemp("copy_llama")
    corpus = ([PROMPT_WITH_INPUT, PROMPT_NO_INPUT] * 50 + [" ".join(WORDS)] * 20 + list(COPY_TASKS) * 20
              + [" " + w for w in WORDS] * 20)
    train_tokenizer(corpus, out, vocab_size=700)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    rng = random.Random(0)

    def sample() -> tuple[list[int], list[int]]:
        instruction = rng.choice(list(COPY_TASKS))
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
        prompt = sp.encode(build_prompt(instruction, " ".join(words)))
        answer = sp.encode(" ".join(COPY_TASKS[instruction](words))) + [2]
        return [1, *prompt, 2, 1, *answer], [-100] * (len(prompt) + 3) + answer

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(sp.get_piece_size(), hidden_size=64, num_layers=2, num_heads=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        batch = [sample() for _ in range(32)]
        width = max(len(ids) for ids, _ in batch)  # right padding: padded positions are never targets
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in batch])
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.generation_config = generation_config()
    model.save_pretrained(out)
    (out / "train_config.yaml").write_text(yaml.safe_dump({"layout": "clean", "dtype": "fp32"}))
    write_hf_tokenizer(out, "clean")
    return out
