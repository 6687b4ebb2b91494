"""The trainer's loss runs the LM head on scored positions only, and gets the full-logits result."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from demo.tiny import llama_config
from openalpaca.loss import scored_positions, sft_ce_sum, token_ce_sum
from openalpaca.prompts import IGNORE_INDEX

X = IGNORE_INDEX


@pytest.fixture()
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(vocab_size=50)).float()


def batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two right-padded rows with their responses at different places."""
    input_ids = torch.tensor([[1, 7, 8, 2, 1, 9, 2, 0], [1, 5, 6, 7, 8, 2, 1, 4]])
    labels = torch.tensor([[X, X, X, X, X, 9, 2, X], [X, X, X, X, X, X, X, 4]])
    attention_mask = (input_ids != 0).long()
    attention_mask[1] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def test_scored_positions_are_the_ones_before_each_target() -> None:
    _, labels = batch()
    assert scored_positions(labels).int().tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0]]


def test_same_loss_and_gradients_as_full_logits(model: LlamaForCausalLM) -> None:
    inputs, labels = batch()
    full = token_ce_sum(model(**inputs).logits, labels)
    full.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    got = sft_ce_sum(model, inputs, labels)
    got.backward()

    assert seen == [(3, model.config.hidden_size)], "the LM head ran on more than the 3 scored positions"
    assert got.item() == pytest.approx(full.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_nothing_scored_is_zero_with_zero_gradients(model: LlamaForCausalLM) -> None:
    """A packed step's filler micro-batch has no target: the loss is 0 and backward still runs."""
    inputs, labels = batch()
    loss = sft_ce_sum(model, inputs, torch.full_like(labels, X))
    loss.backward()
    assert loss.item() == 0
    assert not model.lm_head.weight.grad.any()
