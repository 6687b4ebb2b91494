"""Real 2-rank ZeRO-3 checkpoints, exported every way the README gives, against the engine itself.

Two runs of ``train_sft.py`` through the DeepSpeed launcher on 2 CPU ranks (gloo), in fp32, via
``bench/probe_train.py``, which saves the trained ZeRO-3 engine's own logits on a fixed probe at
the end of the run: a full fine-tune (the original recipe) and a LoRA run (``--lora_r 4``, token
weighting). Each has an eval file, so its last logged eval loss (``logs/metrics.jsonl``, split
"eval") is the loss of the final weights over both ranks.

Checked for the full fine-tune, each folder loaded with ``from_pretrained`` (no missing or
unexpected weight): ``scripts/export_hf.sh SAVE OUT``, and the seed's route,
``python SAVE/zero_to_fp32.py SAVE SAVE/pytorch_model.bin`` then ``scripts/make_shards.sh SAVE``
(which then removes the DeepSpeed state). For LoRA: ``export_hf.sh`` (the adapter merged) and
peft's base + ``SAVE/adapter``.

Bound (fp32). The exported weights are the engine's fp32 weights bit for bit (the two routes are
compared tensor by tensor with ``torch.equal``), so engine and reference run the same arithmetic
on the same numbers and can differ only in the order of fp32 additions. A sum of n products
moves by at most ``n * u * sum|a_i b_i|`` (u = 2^-24); the longest sum here is the MLP's
(n = 128), a logit goes through at most 1 + 4 * layers = 9 such sums, and each is bounded by the
logits' scale. So ``9 * 128 * u * max|logits|`` (about 7e-5 relative) bounds the difference; the
test uses it, and checks training moved the logits by far more than it (so the bound has teeth).

The eval loss over 2 ranks must equal the one-process value: plain transformers on the exported
weights, each eval record encoded here from sentencepiece ids (the layout written out), the mean
of per-sample mean losses (sample weighting) or the token mean (token weighting).
"""

from __future__ import annotations

import json
import sys

import pytest
import sentencepiece as spm
import torch
from transformers import LlamaForCausalLM

from tests.conftest import free_port, make_records, run
from tests.original_code import original_sample

pytestmark = pytest.mark.slow

U = 2.0**-24
N_TRAIN, N_EVAL = 24, 13  # 13 eval records: the two ranks get unequal shares (one pad slot)





def load(path) -> LlamaForCausalLM:
    model, info = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@torch.no_grad()
def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def bound(engine_logits: torch.Tensor, config) -> float:
    return (1 + 4 * config.num_hidden_layers) * config.intermediate_size * U * engine_logits.abs().max().item()


@torch.no_grad()
def eval_loss(model, sp, records, weighting: str) -> float:
    """One process, plain transformers: the eval loss as the recipe weighs it."""
    means, ce_sum, n_sum = [], 0.0, 0
    for record in records:
        ids, labels, mask = original_sample(sp, **record)
        loss = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask]),
                     labels=torch.tensor([labels])).loss.double().item()
        n = sum(label != -100 for label in labels[1:])
        means.append(loss)
        ce_sum, n_sum = ce_sum + loss * n, n_sum + n
    return sum(means) / len(means) if weighting == "sample" else ce_sum / n_sum


def train(tiny_model_dir, tmp_path, name: str, *extra: str) -> dict:
    data, eval_data = tmp_path / "train.json", tmp_path / "eval.json"
    data.write_text(json.dumps(make_records(N_TRAIN, seed=11)))
    eval_records = make_records(N_EVAL, seed=12)
    eval_data.write_text(json.dumps(eval_records))
    save, probe = tmp_path / name, tmp_path / f"{name}_probe.pt"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "bench/probe_train.py", "--config", "config/openllama.yaml", "--model_path", str(tiny_model_dir),
           "--data_path", str(data), "--eval_data_path", str(eval_data), "--save_path", str(save),
           "--dtype", "fp32", "--batch_size", "8", "--epochs", "2", "--warmup_steps", "1", *extra]
    proc = run(cmd, timeout=600, env={"PROBE_OUT": str(probe), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks x 4 accumulation x 1 = batch 8" in proc.stdout
    metrics = [json.loads(line) for line in (save / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m["split"] == "eval"]
    assert evals and evals[-1]["step"] == 2 * N_TRAIN // 8
    return {"save": save, "probe": torch.load(probe), "eval_records": eval_records, "eval_loss": evals[-1]["loss"]}


def test_full_finetune_exports_give_the_engines_logits(tiny_model_dir, tmp_path):
    run_ = train(tiny_model_dir, tmp_path, "full", "--lr", "3e-3")
    save, probe = run_["save"], run_["probe"]
    ids, engine_logits = probe["input_ids"], probe["logits"]
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))

    hf = tmp_path / "hf"
    done = run(["bash", "scripts/export_hf.sh", str(save), str(hf), "--dtype", "fp32", "--max_shard_size", "60KB"])
    assert done.returncode == 0, done.stderr[-2000:]
    done = run([sys.executable, str(save / "zero_to_fp32.py"), str(save), str(save / "pytorch_model.bin")])
    assert done.returncode == 0, done.stderr[-2000:]
    done = run(["bash", "scripts/make_shards.sh", str(save), "--max_shard_size", "60KB"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(save.glob("global_step*")) and not (save / "latest").exists()  # removed by default
    assert not (save / "pytorch_model.bin").exists() and len(list(save.glob("pytorch_model-*-of-*.bin"))) > 1

    exported, sharded, initial = load(hf), load(save), load(tiny_model_dir)
    tol = bound(engine_logits, exported.config)
    a, b = exported.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # both routes: the same bits
    for model in (exported, sharded):
        assert (logits_of(model, ids) - engine_logits).abs().max().item() <= tol
    assert (logits_of(initial, ids) - engine_logits).abs().max().item() > 100 * tol  # training moved them
    # the eval loss the 2 ranks logged is the one-process loss of the final weights (sample weighting)
    assert run_["eval_loss"] == pytest.approx(eval_loss(exported, sp, run_["eval_records"], "sample"), rel=1e-5)


def test_lora_export_merges_the_adapter_and_gives_the_engines_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel

    run_ = train(tiny_model_dir, tmp_path, "lora", "--lr", "1e-2", "--lora_r", "4", "--lora_alpha", "8",
                 "--lora_dropout", "0.0", "--loss_weighting", "token")
    save, probe = run_["save"], run_["probe"]
    ids, engine_logits = probe["input_ids"], probe["logits"]
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))

    hf = tmp_path / "hf"
    done = run(["bash", "scripts/export_hf.sh", str(save), str(hf), "--dtype", "fp32"])
    assert done.returncode == 0, done.stderr[-2000:]
    merged, initial = load(hf), load(tiny_model_dir)
    tol = bound(engine_logits, merged.config)
    assert (logits_of(merged, ids) - engine_logits).abs().max().item() <= tol
    assert (logits_of(initial, ids) - engine_logits).abs().max().item() > 100 * tol
    adapted = PeftModel.from_pretrained(load(tiny_model_dir), str(save / "adapter")).eval()
    assert (logits_of(adapted, ids) - engine_logits).abs().max().item() <= tol
    assert run_["eval_loss"] == pytest.approx(eval_loss(merged, sp, run_["eval_records"], "token"), rel=1e-5)
