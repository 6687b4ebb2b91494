"""Attention over packed rows: each sample of a row attends only to itself.

A packed row holds several samples back to back; ``cu_seq_lens`` (cumulative sample lengths,
the flash-attention varlen convention) mark where each starts. The attention registered here
with transformers (``PACKED_ATTENTION``) runs causal attention on each sample alone: torch's
flash varlen kernel in one call on a GPU where torch has it, else SDPA on each sample's segment.
A sample may also hide some of its own keys (the original OpenAlpaca mask hid its eos tokens).
Without ``cu_seq_lens`` it behaves as transformers' ``sdpa``, so a model loaded with it stays
right on ordinary padded batches and in generation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PACKED_ATTENTION = "openalpaca_packed_sdpa"  # the name registered in transformers' AttentionInterface


def cu_seq_lens_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Sample offsets in the flattened rows, a new sample wherever a position does not follow the last.

    None when every row is a single sequence (nothing is packed).

    >>> cu_seq_lens_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])).tolist()
    [0, 3, 5, 9]
    >>> cu_seq_lens_from_positions(torch.tensor([[0, 1, 2], [0, 1, 2]])) is None
    True
    """
    batch, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    offsets = starts.flatten().nonzero().flatten()
    if len(offsets) == batch:
        return None
    return torch.cat([offsets, offsets.new_tensor([batch * length])]).to(torch.int32)


def _segment_kernels(query: torch.Tensor):
    """SDPA backends for the per-sample segments: on CUDA, not cuDNN's.

    cuDNN attention builds an execution plan per new shape, and packed samples come in every
    length: planning then costs far more CPU time than the kernel runs (docs/results.md, MFU on one H100).
    Flash and memory-efficient kernels take any length.
    """
    if not query.is_cuda:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                      dropout: float = 0.0, scaling: float | None = None,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal SDPA on each sample's segment of the flattened rows: ``(batch, tokens, heads, head_dim)``.

    ``key_mask`` (``(batch, tokens)``, 0 = hidden) hides keys inside the segments, as the
    original layout's ``input_ids != eos`` mask does; a query that would see no key at all then
    sees itself (else its softmax is empty).
    """
    batch, heads, q_len, dim = query.shape
    if bounds[-1] != batch * q_len:
        raise ValueError(f"cu_seq_lens_q ends at {bounds[-1]}, but the batch holds {batch * q_len} tokens")

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).reshape(1, t.shape[1], batch * q_len, dim)

    # split, not slices: a slice's backward writes its gradient into a zeroed copy of the
    # whole row, once per sample (O(samples x tokens) memory traffic); split's is one cat.
    lengths = [b - a for a, b in pairwise(bounds)]
    segments = zip(*(flat(t).split(lengths, dim=2) for t in (query, key, value)), strict=True)
    keys = key_mask.reshape(-1).bool().split(lengths) if key_mask is not None else [None] * len(lengths)
    with _segment_kernels(query):
        out = torch.cat(
            [F.scaled_dot_product_attention(q, k, v, attn_mask=_segment_mask(visible, q.shape[2]), dropout_p=dropout,
                                            is_causal=visible is None, scale=scaling,
                                            enable_gqa=heads != key.shape[1])
             for (q, k, v), visible in zip(segments, keys, strict=True)],
            dim=2,
        )
    return out.reshape(heads, batch, q_len, dim).permute(1, 2, 0, 3).contiguous()


def _segment_mask(visible: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Causal mask of one segment with hidden keys; None when every key is visible."""
    if visible is None or bool(visible.all()):
        return None
    causal = torch.ones(n, n, dtype=torch.bool, device=visible.device).tril()
    mask = causal & visible[None, :]
    return (mask | (torch.eye(n, dtype=torch.bool, device=visible.device) & ~mask.any(-1, keepdim=True)))[None, None]


@functools.cache
def torch_varlen_attn():
    """``torch.nn.attention.varlen.varlen_attn`` made causal, or None where this torch lacks it.

    Its causal switch moved between torch releases (``is_causal=True``, later
    ``window_size=(-1, 0)``); both are handled. Looked up once, not in every attention call.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "is_causal" in inspect.signature(varlen_attn).parameters:
        return functools.partial(varlen_attn, is_causal=True)
    return functools.partial(varlen_attn, window_size=(-1, 0))


def varlen_kernel(query: torch.Tensor, key: torch.Tensor, dropout: float):
    """torch's own flash-attention varlen kernel, causal, where it applies to these tensors; else None.

    It (CUDA, fp16/bf16, no dropout) runs every packed sample in one kernel, with no per-sample
    Python loop. Heads must match (no grouped-query attention here, as in LLaMA-7B).
    """
    if not query.is_cuda or dropout or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    if query.shape[1] != key.shape[1]:
        return None
    return torch_varlen_attn()


def varlen_attention(kernel, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seq_lens: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """``kernel`` (``varlen_kernel``) over the flattened rows: ``(batch, tokens, heads, head_dim)``."""
    batch, heads, q_len, dim = query.shape
    cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
    total, max_len = torch.stack([cu[-1], (cu[1:] - cu[:-1]).max()]).tolist()  # one host sync
    if total != batch * q_len:
        raise ValueError(f"cu_seq_lens_q ends at {total}, but the batch holds {batch * q_len} tokens")

    def flat(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, tokens, dim) -> (batch * tokens, heads, dim)
        return t.transpose(1, 2).reshape(batch * q_len, t.shape[1], dim)

    out = kernel(flat(query), flat(key), flat(value), cu, cu, max_len, max_len, scale=scaling)
    return out.reshape(batch, q_len, heads, dim)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Block-diagonal causal attention: SDPA on each packed sample's segment alone.

    ``query`` is ``(batch, heads, tokens, head_dim)`` as transformers passes it; with
    ``cu_seq_lens_q`` the rows are read as one flat stream of tokens cut at those offsets (the
    flash-attention varlen convention). A 4D mask over a packed row would spend ``T**2``
    attention work of which only ``sum(n_i**2)`` is kept; this spends only the kept part: on a
    GPU in one call of torch's flash varlen kernel where torch has it (``varlen_kernel``), else
    with torch's fused causal kernel on each segment (``segment_attention``). Without
    ``cu_seq_lens_q``, samples are found where ``position_ids`` restart (as transformers'
    flash-attention path does), else each row is one causal sequence (plain SDPA); with a
    padding mask (the mask function registered with it hands over the 2D mask only when a row
    has padding) or a kv cache longer than the queries it builds the dense mask as ``sdpa``
    does, so a model set to this implementation stays right on any batch.
    Returns ``(batch, tokens, heads, head_dim)`` and no attention weights, as ``sdpa`` does.
    """
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    gqa = heads != key.shape[1]
    if cu_seq_lens_q is None and position_ids is not None and attention_mask is None and q_len == kv_len:
        cu_seq_lens_q = cu_seq_lens_from_positions(position_ids.expand(batch, q_len))
    if cu_seq_lens_q is not None and q_len == kv_len:
        varlen = varlen_kernel(query, key, dropout) if attention_mask is None else None
        if varlen is not None:
            return varlen_attention(varlen, query, key, value, cu_seq_lens_q, scaling), None
        return segment_attention(query, key, value, cu_seq_lens_q.tolist(), dropout, scaling, attention_mask), None
    mask = None
    if attention_mask is not None or q_len != kv_len:
        ones = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        causal = ones.tril(kv_len - q_len)
        mask = causal[None, None]
        if attention_mask is not None:
            # A query that is itself padding would see no key at all (NaN); let it see itself.
            own = causal & ~ones.tril(kv_len - q_len - 1)
            mask = (causal & attention_mask[:, None, None, -kv_len:].bool()) | own
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                         is_causal=mask is None and q_len > 1, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Register ``packed_sdpa_attention`` with transformers under ``PACKED_ATTENTION``.

    Its mask function is flash-attention's: no mask at all for unpadded rows (so a packed row
    never gets a ``T x T`` mask built for it), the 2D padding mask otherwise.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, flash_attention_mask)
    return PACKED_ATTENTION


def attention_implementation(pack: bool, hidden_keys: bool = False) -> str | None:
    """The ``attn_implementation`` to load the model with: None (transformers' default) unless packing.

    Packed rows need attention that reads ``cu_seq_lens``: flash-attention 2's varlen kernel
    when a GPU and ``flash_attn`` are there (transformers passes ``cu_seq_lens_*`` to it) and no
    key is hidden inside a sample, else the attention registered here: torch's own varlen kernel
    on a GPU where torch has it and no key is hidden, else SDPA on each sample's segment.
    ``hidden_keys``: samples carry their own attention mask (``hide_eos_keys``), which
    transformers' flash-attention path would read as padding and drop those tokens as queries too.
    """
    if not pack:
        return None
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None and not hidden_keys:
        return "flash_attention_2"
    return register_packed_attention()
