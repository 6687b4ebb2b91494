"""Packed attention (model/attention.py): each packed sample attends only to itself, and a model
loaded with it stays right on ordinary padded batches."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from model.attention import packed_sdpa_attention, segment_attention, varlen_attention, varlen_kernel
from openalpaca.data import collate
from openalpaca.packing import collate_packed, model_inputs
from openalpaca.prompts import EncodedSample

TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_packed_attention_on_padded_and_plain_batches_is_sdpa(models, samples):
    """A model loaded with the packed attention stays right on the seed's padded micro-batches."""
    packed_model, seed_model = models
    batch = collate(samples[:3] + [None])
    with torch.no_grad():
        got = packed_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = seed_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(got[keep], want[keep], **TOL)
        plain = collate([samples[0]])["input_ids"]
        torch.testing.assert_close(packed_model(input_ids=plain).logits, seed_model(input_ids=plain).logits, **TOL)


# ---------------------------------------------------------------------------- attention stays inside a sample


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_is_block_diagonal_causal(kv_heads):
    torch.manual_seed(0)
    bounds = [0, 3, 7, 12]
    q = torch.randn(1, 4, 12, 8, requires_grad=True)
    k = torch.randn(1, kv_heads, 12, 8, requires_grad=True)
    v = torch.randn(1, kv_heads, 12, 8, requires_grad=True)
    module = torch.nn.Module()
    out, _ = packed_sdpa_attention(module, q, k, v, None, cu_seq_lens_q=torch.tensor(bounds, dtype=torch.int32))

    seg = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 4, 5]))
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=kv_heads != 4).transpose(1, 2)
    torch.testing.assert_close(out, want, **TOL)

    out[:, 7:].sum().backward()  # the last sample's outputs
    for t in (q, k, v):
        assert t.grad[:, :, :7].abs().max() == 0, "a sample's output depends on an earlier sample"
        assert t.grad[:, :, 7:].abs().max() > 0


def test_varlen_layout_matches_per_sample_attention():
    """varlen_attention's reshapes hand a (tokens, heads, dim) kernel the rows as one stream and read it back.

    torch's varlen kernel is CUDA-only (checked against per-sample SDPA on an H100 by bench/mfu.py);
    here a CPU kernel with its calling convention stands in, over 2 rows of 2 samples each.
    """
    torch.manual_seed(0)
    bounds = [0, 3, 10, 16, 20]  # 2 rows of 10 tokens: samples of 3 + 7, then 6 + 4

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        assert q.shape == (20, 4, 8) and cu_q.dtype == torch.int32 and (max_q, max_k) == (7, 7)
        cuts = cu_q.tolist()
        return torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                         scale=scale).transpose(0, 1)
                          for a, b in pairwise(cuts)])

    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    got = varlen_attention(kernel, q, k, v, torch.tensor(bounds))
    torch.testing.assert_close(got, segment_attention(q, k, v, bounds), **TOL)
    assert got.shape == (2, 10, 4, 8)
    with pytest.raises(ValueError, match="ends at 19, but the batch holds 20 tokens"):
        varlen_attention(kernel, q, k, v, torch.tensor([0, 3, 10, 16, 19]))
    assert varlen_kernel(q.bfloat16(), k, 0.0) is None  # CPU: the per-sample path


def test_changing_one_sample_leaves_the_others_unchanged(models, samples):
    packed_model, _ = models
    first, rest = samples[0], samples[1:4]
    other = EncodedSample([first.input_ids[0]] + [5] * (len(first.input_ids) - 1), first.labels, False)
    with torch.no_grad():
        a = packed_model(**model_inputs(collate_packed([first, *rest]), "cpu")).logits
        b = packed_model(**model_inputs(collate_packed([other, *rest]), "cpu")).logits
    n = len(first.input_ids)
    assert not torch.allclose(a[:, :n], b[:, :n])
    torch.testing.assert_close(a[:, n:], b[:, n:], rtol=0, atol=1e-6)


def test_position_ids_alone_mark_the_samples(models, samples):
    """Without cu_seq_lens (e.g. another collator), restarting positions still cut the row."""
    packed_model, _ = models
    batch = collate_packed(samples[:4])
    with torch.no_grad():
        want = packed_model(**model_inputs(batch, "cpu")).logits
        got = packed_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
