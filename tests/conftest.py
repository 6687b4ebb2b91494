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
