"""bench/peers.py at its smallest: the three trainers run, the JSON line has its keys and sane values.

One run of the benchmark (one optimizer step of 8 samples, a 2-layer, 32-wide model, 2 CPU ranks)
is shared by the tests. No timing is checked, only what the runs must agree on: the step-1 loss is
the untrained model's loss on the training data, computed here with plain transformers and
sentencepiece (not the project's prompt code), and the supervised token counts follow from the
data file alone.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                                    reason="TRL is not installed (requirements.txt pins it)")]

MODES = ("fast", "original", "trl")
PER_MODE_KEYS = {"tokens_per_s", "seconds_per_step", "peak_mib_per_rank", "final_train_loss", "heldout_loss",
                 "supervised_tokens"}
TINY = ["--steps", "1", "--repeats", "1", "--batch_size", "8", "--heldout", "4", "--hidden_size", "32",
        "--num_layers", "2", "--num_heads", "4", "--intermediate_size", "64", "--vocab_size", "512"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("peers")
    proc = run([sys.executable, "bench/peers.py", *TINY, "--work_dir", str(work)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), work


def response_targets(work: Path) -> list[list[int]]:
    """Each training record's response ids and its eos, by sentencepiece itself."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(work / "model" / "tokenizer.model"))
    return [sp.encode(r["output"]) + [2] for r in json.loads((work / "data.json").read_text())]


def test_the_json_line_has_every_figure_of_every_mode(bench):
    result, _ = bench
    for mode in MODES:
        assert set(result[mode]) == PER_MODE_KEYS, mode
        figures = result[mode]
        assert figures["tokens_per_s"] > 0 and figures["seconds_per_step"] > 0 and figures["peak_mib_per_rank"] > 0
        assert math.isfinite(figures["heldout_loss"]) and 0 < figures["heldout_loss"] < 2 * math.log(512)
    for mode in ("fast", "original"):
        assert result[f"{mode}_vs_trl_tokens_per_s"] > 0
        assert math.isfinite(result[f"{mode}_minus_trl_heldout_loss"])
    assert result["steps"] == 1 and result["ranks"] == 2 and result["device"] == "cpu"


def test_trl_version_is_the_pinned_one(bench):
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line)
    assert bench[0]["trl_version"] == pins["trl"]


def test_every_trainer_supervises_the_tokens_the_data_gives(bench):
    """Counted in what each trainer trains on (the project's trainer: its batches' labels; TRL: the
    micro-batches its collator hands the model), against the data file read by sentencepiece."""
    result, work = bench
    targets = response_targets(work)
    assert result["fast"]["supervised_tokens"] == result["trl"]["supervised_tokens"] == sum(map(len, targets))
    # The original layout also trains eos, bos, bos after each prompt.
    assert result["original"]["supervised_tokens"] == sum(len(t) + 3 for t in targets)


def test_fast_recipe_and_trl_start_from_the_same_loss(bench):
    """Step 1 holds every sample, so its loss is the untrained model's mean loss per response token."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM

    result, work = bench
    sp = spm.SentencePieceProcessor(model_file=str(work / "model" / "tokenizer.model"))
    model = LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    ce, count = 0.0, 0
    with torch.no_grad():
        for rec in json.loads((work / "data.json").read_text()):
            text = (f"### Input:\n{rec['input']}\n\n" if rec["input"] else "") + \
                f"### Instruction:\n{rec['instruction']}\n\n### Response:"
            context, target = [1, *sp.encode(text), 2, 1], sp.encode(rec["output"]) + [2]
            logits = model(input_ids=torch.tensor([context + target])).logits[0, len(context) - 1:-1]
            ce += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
            count += len(target)
    expected = ce / count
    assert result["fast"]["final_train_loss"] == pytest.approx(expected, abs=1e-3)
    assert result["trl"]["final_train_loss"] == pytest.approx(expected, abs=1e-3)
