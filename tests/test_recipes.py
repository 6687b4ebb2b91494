"""Both recipes end to end at tiny size, through the DeepSpeed launcher on 2 CPU ranks (ZeRO-3).

``config/openllama.yaml`` (the original) and ``config/openllama_fast.yaml`` run as written, with
only the paths, the precision (fp32: CPU) and the lr (a tiny random model) overridden. For each:
the micro-batches of the first optimizer step equal the construction written out here from the
facts of the original code (sentencepiece ids, ``[1] + s + [2] + [1] + t + [2]``, its labels and
``ids != 2`` mask; or the clean layout, packed), the first step's logged loss and gradient norm
equal plain transformers' from the initial weights, and the loss goes down.
"""

from __future__ import annotations

import json
import sys
from itertools import pairwise

import pytest
import sentencepiece as spm
import torch

from model.llama import load_model
from tests.conftest import free_port, make_records, run
from tests.original_code import clean_sample, original_sample

pytestmark = pytest.mark.slow
N_RECORDS = 320  # 2 epochs x 320 // 64 = 10 steps (original); 2 x ceil(320 / 64) = 10 (fast)






def train(config: str, tiny_model_dir, tmp_path) -> tuple[list[dict], dict[int, list[dict]], list[dict]]:
    records = make_records(N_RECORDS, seed=5)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    save, trace = tmp_path / "save", tmp_path / "trace"
    trace.mkdir()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "tests/trace_train.py", "--config", config, "--model_path", str(tiny_model_dir), "--data_path", str(data),
           "--save_path", str(save), "--dtype", "fp32", "--lr", "3e-3"]
    proc = run(cmd, timeout=600, env={"TRACE_DIR": str(trace), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    batches = {r: torch.load(trace / f"rank{r}.pt", weights_only=False) for r in range(2)}
    metrics = [json.loads(line) for line in (save / "logs" / "metrics.jsonl").read_text().splitlines()]
    return records, batches, [m for m in metrics if m["split"] == "train"]


def expected_first_step(tiny_model_dir, samples, weighting: str) -> tuple[float, float]:
    """The first step's loss and gradient norm with plain transformers from the initial weights.

    ``samples``: (input_ids, labels, attention_mask) of every sample of the step, over both ranks.
    """
    model = load_model(tiny_model_dir, "fp32", attn_implementation="sdpa")
    n_tokens = sum(sum(label != -100 for label in labels[1:]) for _, labels, _ in samples)
    total = 0.0
    for ids, labels, mask in samples:
        loss = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask]),
                     labels=torch.tensor([labels])).loss  # the mean over the sample's targets
        n = sum(label != -100 for label in labels[1:])
        part = loss / len(samples) if weighting == "sample" else loss * n / n_tokens
        part.backward()
        total += part.item()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    return total, norm


def test_original_recipe_trains_the_originals_tensors(tiny_model_dir, tmp_path):
    records, batches, metrics = train("config/openllama.yaml", tiny_model_dir, tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    step = []
    for rank in range(2):
        assert len(batches[rank]) == 32  # 64 = 2 ranks x 32 accumulation x micro-batch 1
        for batch in batches[rank]:
            (sample_id,) = batch["sample_ids"]
            ids, labels, mask = original_sample(sp, **records[sample_id])
            assert batch["input_ids"].tolist() == [ids]
            assert batch["labels"].tolist() == [labels]
            assert batch["attention_mask"].tolist() == [mask]
            step.append((ids, labels, mask))
    assert len(metrics) == 10 == 2 * N_RECORDS // 64
    loss, norm = expected_first_step(tiny_model_dir, step, "sample")
    assert metrics[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3, [m["loss"] for m in metrics]


def test_fast_recipe_trains_clean_packed_rows(tiny_model_dir, tmp_path):
    records, batches, metrics = train("config/openllama_fast.yaml", tiny_model_dir, tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    step = []
    for rank in range(2):
        for batch in batches[rank]:
            bounds = batch["cu_seq_lens_q"].tolist()
            assert "attention_mask" not in batch and len(bounds) == len(batch["sample_ids"]) + 1
            for (a, b), sample_id in zip(pairwise(bounds), batch["sample_ids"], strict=True):
                ids, labels = clean_sample(sp, **records[sample_id])
                assert batch["input_ids"][0, a:b].tolist() == ids
                assert batch["labels"][0, a:b].tolist() == labels
                assert batch["position_ids"][0, a:b].tolist() == list(range(b - a))
                step.append((ids, labels, [1] * len(ids)))
    assert len(step) == 64 and len(metrics) == 10
    loss, norm = expected_first_step(tiny_model_dir, step, "token")
    assert metrics[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3, [m["loss"] for m in metrics]
