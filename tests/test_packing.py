"""Packing gives the seed's result per sample: losses, gradients, attention, labels, epoch coverage.

The reference is always the seed's way: each sample run alone through transformers' own
``sdpa`` attention. Everything is fp32 on CPU, so "the same" means within 1e-5.
"""

from __future__ import annotations

import json
import random
import re
import sys
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from openalpaca.batching import token_counts
from openalpaca.config import ConfigError, TrainConfig
from openalpaca.data import PAD_SLOT, SFTDataset, collate, micro_batches, step_slots
from openalpaca.loss import sft_ce_sum, token_ce_sum
from openalpaca.packing import collate_packed, model_inputs, pack_step, packed_micro_batches, rank_packed_micro_batches
from openalpaca.prompts import IGNORE_INDEX, EncodedSample, SampleFormat
from tests.conftest import make_records, run

TOL = {"rtol": 1e-5, "atol": 1e-5}


def dolly_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Many short samples, a long tail clipped at 1024 tokens."""
    rng = random.Random(seed)
    return [min(1024, max(16, int(rng.lognormvariate(5.0, 0.9)))) for _ in range(n)]


def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Summed next-token CE of each packed sample (the loss as train_sft.py computes it, split up)."""
    ce = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    # ce[t] is the loss of predicting token t + 1; sample [a, b) owns targets a + 1 .. b - 1.
    return torch.stack([ce[a : b - 1].sum() for a, b in pairwise(bounds)])


# ---------------------------------------------------------------------------- same result per sample


def test_packed_losses_and_gradients_equal_one_by_one(models, samples):
    packed_model, seed_model = models
    n_tokens = sum(s.num_supervised for s in samples)

    batch = collate_packed(samples)
    logits = packed_model(**model_inputs(batch, "cpu")).logits
    packed_losses = per_sample_ce(logits, batch["labels"], batch["cu_seq_lens_q"].tolist())
    (packed_losses.sum() / n_tokens).backward()
    packed_grads = {n: p.grad.clone() for n, p in packed_model.named_parameters()}

    seed_losses = []
    for s in samples:
        one = collate([s])
        ce = token_ce_sum(seed_model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits,
                          one["labels"])
        (ce / n_tokens).backward()
        seed_losses.append(ce.detach())

    torch.testing.assert_close(packed_losses.detach(), torch.stack(seed_losses), **TOL)
    assert packed_losses.sum().item() == pytest.approx(sum(seed_losses).item(), rel=1e-6)
    for name, p in seed_model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    packed_model.zero_grad(set_to_none=True)
    seed_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fmt, weighting", [(SampleFormat("original", "keep_end", True), "sample"),
                                            (SampleFormat("clean", "keep_prompt", False), "token")])
def test_packed_step_equals_unpacked_under_both_recipes(models, tokenizer, fmt, weighting):
    """The trainer's packed loss (``sft_ce_sum`` with the batch's weights) and its gradients equal
    transformers' own loss of each sample alone (its ``labels=`` mean, with the sample's attention
    mask, hidden eos keys included), averaged per sample (original) or per token (fast)."""
    packed_model, seed_model = models
    samples = SFTDataset.from_records(make_records(8, seed=3), tokenizer, 64, fmt).samples
    assert (0 in samples[0].mask) == fmt.hide_eos_keys
    assert_packed_step_equals_unpacked(packed_model, seed_model, samples, weighting)


def assert_packed_step_equals_unpacked(packed_model, seed_model, samples, weighting: str) -> None:
    """The packed loss of ``samples`` in one row and its gradients equal transformers' own loss of
    each sample alone, averaged per sample or per token (``weighting``)."""
    batch = collate_packed(samples, weighting)
    total = len(samples) if weighting == "sample" else sum(s.num_supervised for s in samples)
    loss = sft_ce_sum(packed_model, model_inputs(batch, "cpu"), batch["labels"], batch.get("weights")) / total
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in packed_model.named_parameters()}

    want = 0.0
    for s in samples:
        one = collate([s])
        mean = seed_model(input_ids=one["input_ids"], attention_mask=one["attention_mask"], labels=one["labels"]).loss
        part = mean / len(samples) if weighting == "sample" else mean * s.num_supervised / total
        part.backward()
        want += part.item()

    assert loss.item() == pytest.approx(want, rel=1e-5)
    for name, p in seed_model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    packed_model.zero_grad(set_to_none=True)
    seed_model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- labels and positions


def test_boundary_labels_and_positions(samples):
    # A first label that is not ignored would train the previous sample's last token on it.
    odd = EncodedSample(samples[1].input_ids, [samples[1].input_ids[0]] + samples[1].labels[1:], False)
    batch = collate_packed([samples[0], odd, samples[2]])
    labels, positions = batch["labels"][0], batch["position_ids"][0]
    bounds = batch["cu_seq_lens_q"].tolist()
    assert bounds == [0] + torch.tensor([len(s.input_ids) for s in (samples[0], odd, samples[2])]).cumsum(0).tolist()
    assert (positions == 0).nonzero().flatten().tolist() == bounds[:-1]
    assert (labels[bounds[:-1]] == IGNORE_INDEX).all()
    for (a, b), s in zip(pairwise(bounds), (samples[0], odd, samples[2]), strict=True):
        assert positions[a:b].tolist() == list(range(b - a))
        assert labels[a + 1 : b].tolist() == s.labels[1:]
    assert int((labels != IGNORE_INDEX).sum()) == samples[0].num_supervised + samples[1].num_supervised + \
        samples[2].num_supervised
    assert batch["max_length_q"] == max(b - a for a, b in pairwise(bounds))


def test_pad_micro_batch_carries_no_loss():
    batch = collate_packed([])
    assert batch["input_ids"].shape == (1, 1) and (batch["labels"] == IGNORE_INDEX).all()
    assert token_ce_sum(torch.randn(1, 1, 7, requires_grad=True), batch["labels"]).item() == 0


# ---------------------------------------------------------------------------- the planner


def packed_plan(lengths, epoch, seed, batch, budget, world, rank):
    """One epoch of this rank's packed micro-batches (epoch tail: pad)."""
    per_epoch = -(-len(lengths) // batch)
    return [rank_packed_micro_batches(step_slots(len(lengths), s, seed, batch, "pad"), lengths, budget, world, rank)
            for s in range(epoch * per_epoch, (epoch + 1) * per_epoch)]


@pytest.mark.parametrize("world, budget", [(1, 1024), (2, 1024), (2, 2048), (8, 4096)])
def test_every_sample_exactly_once_per_epoch_over_all_ranks(world, budget):
    lengths = dolly_like_lengths(1000)
    for epoch in range(2):
        seed_plan = [step_slots(len(lengths), s, 7, 64, "pad") for s in range(epoch * 16, epoch * 16 + 16)]
        plans = [packed_plan(lengths, epoch, 7, 64, budget, world, r) for r in range(world)]
        assert all(len(p) == len(seed_plan) == 16 for p in plans)  # ceil(1000 / 64) optimizer steps
        seen = []
        for step, slots in enumerate(seed_plan):
            assert len({len(p[step]) for p in plans}) == 1, "ranks disagree on the micro-steps of a step"
            rows = [row for p in plans for row in p[step]]
            assert all(sum(lengths[i] for i in row) <= budget for row in rows)
            step_ids = [i for row in rows for i in row]
            # The same samples as the seed's step: lr and schedule mean the same thing.
            assert sorted(step_ids) == sorted(i for i in slots if i != PAD_SLOT)
            seen += step_ids
        assert sorted(seen) == list(range(len(lengths)))
    assert plans[0] == packed_plan(lengths, 1, 7, 64, budget, world, 0)  # deterministic
    assert plans[0] != packed_plan(lengths, 0, 7, 64, budget, world, 0)  # reshuffled per epoch


def test_rows_are_full_and_few():
    lengths = dolly_like_lengths(1000)
    world, budget = 2, 2048
    plan = [packed_plan(lengths, 0, 0, 64, budget, world, r) for r in range(world)]
    micro_steps = sum(len(step) for step in plan[0])
    assert micro_steps * 4 <= 1000 / world  # the seed runs one sample per micro-step
    # Each step needs ceil(tokens / (world * budget)) micro-steps, or one more when samples do not fit.
    for step in range(len(plan[0])):
        tokens = sum(lengths[i] for p in plan for row in p[step] for i in row)
        assert len(plan[0][step]) <= -(-tokens // (world * budget)) + 1


def test_pack_step_rejects_a_sample_over_the_budget():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, over the budget of 8"):
        pack_step([0, 1], [3, 9], max_tokens=8, num_ranks=1)
    assert pack_step([], [], max_tokens=8, num_ranks=2) == [[], []]


def test_token_counts_seed_and_packed(samples):
    dataset = SFTDataset(samples, list(range(len(samples))), 0, 0)
    seed = micro_batches(dataset, [[0, 1], [PAD_SLOT]])
    width = max(len(samples[0].input_ids), len(samples[1].input_ids))
    real = len(samples[0].input_ids) + len(samples[1].input_ids)
    assert token_counts(seed) == (2 * width + 1, 2 * width - real + 1)
    packed = packed_micro_batches(dataset, [[0, 1], []])
    assert token_counts(packed) == (real + 1, 1)
    assert packed[0]["sample_ids"] == [0, 1] and packed[1]["sample_ids"] == []


# ---------------------------------------------------------------------------- config


def test_config_fields():
    from train_sft import make_batching

    assert make_batching(TrainConfig(pack=True, max_length=512), 1, 0).max_tokens == 512
    packed = TrainConfig(pack=True, max_length=512, max_tokens_per_micro_batch=2048)
    assert make_batching(packed, 1, 0).max_tokens == 2048
    assert not make_batching(TrainConfig(max_length=512), 1, 0).packed
    for kwargs, message in [
        ({"max_tokens_per_micro_batch": 2048}, "needs pack: true"),
        ({"pack": True, "max_tokens_per_micro_batch": 100, "max_length": 512}, ">= max_length 512"),
        ({"pack": True, "max_tokens_per_micro_batch": -1}, "must be >= 0"),
        ({"pack": True, "micro_batch_size": 4, "batch_size": 8}, "micro_batch_size must be 1 with pack"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainConfig(**kwargs)


# ---------------------------------------------------------------------------- the trainer


LOSS = re.compile(r"^step (\d+)/\d+ epoch \d+ loss ([\d.]+)", re.M)


@pytest.mark.slow
@pytest.mark.parametrize("config, padded", [("config/openllama.yaml", ["--micro_batch_size", "1"]),
                                            ("config/openllama_fast.yaml", ["--pack", "false", "--micro_batch_size",
                                                                            "4", "--max_tokens_per_micro_batch", "0"])])
def test_trainer_packed_on_two_ranks_ends_with_the_weights_of_padded_on_one(tiny_model_dir, alpaca_file, tmp_path,
                                                                           monkeypatch, config, padded):
    """Same optimizer steps, same samples, same loss weighting (each recipe's: per sample for the
    original, hidden eos keys included; per token for the fast one): the same loss curve and the
    same final weights, packed on 2 ranks or padded on 1.

    Rows of 256 tokens (samples of 51 to 113) force several micro-batches per step. The runs differ
    only in the order floats are summed (attention per segment or over a padded row, gradients
    accumulated over other micro-batches and ranks): about 1e-7 relative per step, so after 3 Adam
    steps of lr 5e-3 on weights of order 1 the fp32 weights agree within 1e-6; a wrong loss scale or
    a sample seen by the wrong step moves them by about lr.
    """
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores: more threads only contend
    common = ["--config", config, "--model_path", str(tiny_model_dir), "--data_path", str(alpaca_file), "--epochs",
              "1", "--batch_size", "16", "--lr", "5e-3", "--warmup_steps", "1", "--warmup_ratio", "0", "--dtype",
              "fp32", "--max_length", "128", "--gradient_checkpointing", "false"]
    seed = run([sys.executable, "train_sft.py", *common, *padded, "--save_path", str(tmp_path / "seed")])
    assert seed.returncode == 0, seed.stderr[-3000:]
    packed = run(["bash", "scripts/train_sft.sh", "--num_gpus", "2", *common, "--save_path", str(tmp_path / "packed"),
                  "--pack", "true", "--micro_batch_size", "1", "--max_tokens_per_micro_batch", "256"])
    assert packed.returncode == 0, packed.stderr[-3000:]

    seed_curve = [float(m[1]) for m in LOSS.findall(seed.stdout)]
    packed_curve = [float(m[1]) for m in LOSS.findall(packed.stdout)]
    assert len(seed_curve) == len(packed_curve) == 3  # 48 // 16 (carry) = ceil(48 / 16) (pad)
    assert packed_curve == pytest.approx(seed_curve, abs=2e-4)
    seed_run, packed_run = (json.loads((tmp_path / name / "logs" / "summary.json").read_text())
                            for name in ("seed", "packed"))
    assert packed_run["micro_steps_per_rank"] < seed_run["micro_steps_per_rank"]
    assert packed_run["padding_tokens"] < 0.05 * packed_run["tokens_processed"]
    assert seed_run["supervised_tokens"] == packed_run["supervised_tokens"]

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    a, b = (get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / name)) for name in ("seed", "packed"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
