"""A reduced CPU demo, end to end: every stage's outputs, not the accuracy (that is the demo's job)."""

import json
import re

import pytest

from demo import synthetic
from tests.conftest import run

pytestmark = pytest.mark.slow  # launcher runs and child processes


def test_reduced_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = run(["bash", "-c", f"DEMO_DIR={out} N_TRAIN=64 N_HELDOUT=18 N_CHATS=32 N_HELDOUT_CHATS=8 "
                              "bash scripts/demo.sh --epochs 1"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()

    # 1-2: synthetic dolly data and conversations, then process_dataset.py's Alpaca and messages files
    train, heldout = synthetic.read_jsonl(out / "data/train.jsonl"), synthetic.read_jsonl(out / "data/heldout.jsonl")
    assert (len(train), len(heldout)) == (64, 18)
    assert {synthetic.split_of(r) for r in train} == {"train"}
    assert {synthetic.split_of(r) for r in heldout} == {"heldout"}
    alpaca = json.loads((out / "data/openalpaca.json").read_text())
    first = train[0]
    assert alpaca[0] == {"instruction": first["instruction"], "input": first["context"], "output": first["response"]}
    assert any(line.startswith("read 64 records") for line in lines)
    chats = synthetic.read_jsonl(out / "data/chats.jsonl")
    assert len(chats) == 32 and {synthetic.chat_split_of(c) for c in chats} == {"train"}
    assert json.loads((out / "data/chats.json").read_text())[0] == {"messages": chats[0]["messages"]}
    assert {synthetic.chat_split_of(c) for c in synthetic.read_jsonl(out / "data/heldout_chats.jsonl")} == \
        {"heldout"}
    # 3: the base model folder is shaped like openllama_ckpt/
    for name in ["config.json", "tokenizer.model", "tokenizer_config.json", "model.safetensors"]:
        assert (out / "base" / name).is_file(), name
    # 4: ZeRO-3 on 2 ranks
    assert "96 samples (0 skipped" in proc.stdout and "batch 32 packed into rows of up to 1024 tokens" in proc.stdout
    save = out / "openalpaca"
    assert f"checkpoint {save}/global_step3" in proc.stdout
    # 5: the seed's conversion and shards (the consolidated file and the DeepSpeed state are replaced by
    # shards + index, as the original's make_shards.sh did)
    assert not (save / "latest").exists() and not (save / "global_step3").exists()
    index = json.loads((save / "pytorch_model.bin.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(re.fullmatch(r"pytorch_model-\d{5}-of-\d{5}\.bin", s) for s in shards)
    assert not (save / "pytorch_model.bin").exists()
    # 6: the score, in the exact format, last, the second turns' on the line before
    assert re.fullmatch(r"held-out exact match: \d\.\d\d \(before training: \d\.\d\d\)", lines[-1]), lines[-1]
    assert re.fullmatch(r"held-out second-turn exact match: \d\.\d\d \(before training: \d\.\d\d\)",
                        lines[-2]), lines[-2]
    for task in synthetic.TASKS:
        assert any(re.fullmatch(rf"{task}\s+\d+\s+\d\.\d\d", line) for line in lines), task
    figures = json.loads((out / "eval.json").read_text())
    assert {"exact_match", "second_turn_exact_match", "per_task", "wall_seconds"} <= set(figures)
    for task in synthetic.CHAT_TASKS:
        assert any(re.fullmatch(rf"{re.escape(task)} \(2nd\)\s+2\s+\d\.\d\d", line) for line in lines), task
