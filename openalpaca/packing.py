"""Padding-free packing: several samples per micro-batch row, each attending only to itself.

The seed runs one ~220-token sample per micro-batch, so under ZeRO-3 every sample pays a full
gather of the weights in forward and backward. Packing puts the samples of an optimizer step
into as few rows as fit a token budget, with three guarantees that keep the result per sample
the seed's:

* **Same steps.** Step ``s`` holds exactly the samples of ``data.step_slots`` for ``s`` (same
  shuffle of ``(seed, epoch)``, same ``batch_size`` samples per step), so steps per epoch,
  samples per step, lr and schedule mean what they mean unpacked; only how a step's samples
  are cut into micro-batches differs.
* **Own attention and positions.** Position ids restart at 0 for every sample, and attention
  is block-diagonal: ``cu_seq_lens`` mark the sample boundaries and the attention function
  registered here runs causal SDPA on each sample's segment alone (flash-attention varlen on a
  GPU with ``flash_attn`` installed), so no FLOP is spent on a masked block.
* **Own labels.** A sample's first token is never a target, so the last token of one sample is
  never trained to predict the first token of the next.

The trainer normalises the loss over the whole optimizer step (all micro-batches, all ranks),
per token or per sample (``loss_weighting``), so a packed step's gradient equals the unpacked
one up to float rounding under either weighting.

How the config maps: ``batch_size`` keeps its meaning (samples per optimizer step over all
ranks), so steps, warmup and decay are as unpacked; ``max_tokens_per_micro_batch``
(0: ``max_length``) bounds a row; ``micro_batch_size`` must stay 1 and DeepSpeed's
``gradient_accumulation_steps`` stays ``batch_size / world`` in its JSON, where it only scales
the loss, a scale the trainer undoes.

A packed step may need a different number of micro-batches than the next one. Every rank runs
the same number within a step (empty "pad" micro-batches, one unsupervised token, fill the
gap, because ZeRO-3's collectives need every rank in every micro-step), and the trainer tells
DeepSpeed where the step ends (``engine.set_gradient_accumulation_boundary``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from openalpaca.data import PAD_SLOT, SFTDataset, target_weights
from openalpaca.prompts import BOS_ID, IGNORE_INDEX, EncodedSample

PACKED_ATTENTION = "openalpaca_packed_sdpa"  # the name registered in transformers' AttentionInterface
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                "max_length_q", "max_length_k")  # batch keys the model's forward takes


# ---------------------------------------------------------------------------- planning


def pack_step(indices: Sequence[int], lengths: Sequence[int], max_tokens: int, num_ranks: int) -> list[list[int]]:
    """Cut one optimizer step's samples into ``num_ranks * k`` rows of at most ``max_tokens`` tokens.

    ``k`` (micro-batches per rank) starts at the lower bound ``ceil(tokens / (num_ranks *
    max_tokens))`` and grows only when the samples do not fit. Longest sample first, each goes
    to the least-filled row: rows come out nearly equal, which matters because under ZeRO-3 a
    micro-step lasts as long as its fullest row on any rank. Rows, fullest first, are dealt to
    the ``W`` ranks in a snake order (rank ``r`` gets the ``r``-th, the ``(2W-1-r)``-th, the
    ``(2W+r)``-th, ...) so that no rank always gets the fuller one, and returned so that rank
    ``r``'s micro-batches are ``rows[r::W]``. An empty row is a pad micro-batch. Ties break on
    the index: deterministic.

    Four samples of 5, 3, 4 and 2 tokens, rows of at most 6 tokens, two ranks: 14 tokens need
    two micro-batches per rank. Rank ``r`` takes rows ``r, r + 2``: rank 0 runs sample 0 then
    sample 3 (5 + 2 tokens), rank 1 sample 2 then sample 1 (4 + 3 tokens)::

    >>> pack_step([0, 1, 2, 3], lengths=[5, 3, 4, 2], max_tokens=6, num_ranks=2)
    [[0], [2], [3], [1]]
    """
    too_long = [i for i in indices if lengths[i] > max_tokens]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, over the budget of {max_tokens}")
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    k = max(1, math.ceil(sum(lengths[i] for i in indices) / (num_ranks * max_tokens)))
    while True:
        rows: list[list[int]] = [[] for _ in range(num_ranks * k)]
        load = [0] * len(rows)
        for i in order:
            r = min(range(len(rows)), key=lambda j: (load[j], j))
            if load[r] + lengths[i] > max_tokens:
                break
            rows[r].append(i)
            load[r] += lengths[i]
        else:
            break
        k += 1
    by_load = sorted(range(len(rows)), key=lambda j: (-load[j], j))
    dealt: list[list[int]] = [[] for _ in range(num_ranks)]
    for n, j in enumerate(by_load):
        lap, pos = divmod(n, num_ranks)
        dealt[pos if lap % 2 == 0 else num_ranks - 1 - pos].append(j)
    return [rows[j] for lap in range(k) for j in (d[lap] for d in dealt)]


def rank_packed_micro_batches(slots: Sequence[int], lengths: Sequence[int], max_tokens: int, world_size: int,
                              rank: int) -> list[list[int]]:
    """This rank's packed micro-batches of one step (``data.step_slots``): ``[[index, ...], ...]``.

    Every rank computes the same global packing of the step and takes its share, so every
    sample of the step is used once and all ranks run the same number of micro-steps; ``[]`` is
    a pad micro-batch.

    >>> lengths = [5, 3, 4, 2, 6]
    >>> rank_packed_micro_batches([4, 0, 1, 3], lengths, max_tokens=8, world_size=2, rank=0)
    [[4, 3]]
    >>> rank_packed_micro_batches([4, 0, 1, 3], lengths, max_tokens=8, world_size=2, rank=1)
    [[0, 1]]
    """
    return pack_step([i for i in slots if i != PAD_SLOT], lengths, max_tokens, world_size)[rank::world_size]


# ---------------------------------------------------------------------------- collation


def collate_packed(samples: Sequence[EncodedSample], weighting: str = "token") -> dict[str, Any]:
    """Concatenate a micro-batch's samples into one row, with no padding at all.

    Position ids restart at 0 for each sample and ``cu_seq_lens`` (cumulative sample lengths,
    int32 as flash-attention wants them) tell the attention where each sample starts. Each
    sample's first label is ``IGNORE_INDEX`` whatever it was: the logits at the last token of
    a sample must not be trained to predict the first token of the next one (unpacked, the
    first label is never a target either). An empty list (a pad micro-batch) gives a one-token
    row with no label. A sample's own attention mask (``hide_eos_keys``) comes along as
    ``attention_mask`` when it hides anything; ``weighting="sample"`` adds ``weights``
    (``data.target_weights``). Worked example::

        sample a: input_ids [1, 5, 2, 1, 9, 2]  labels [-100, -100, -100, -100, 9, 2]
        sample b: input_ids [1, 6, 2, 1, 8]     labels [-100, -100, -100, -100, 8]

    >>> a = EncodedSample([1, 5, 2, 1, 9, 2], [-100, -100, -100, -100, 9, 2], False)
    >>> b = EncodedSample([1, 6, 2, 1, 8], [-100, -100, -100, -100, 8], False)
    >>> batch = collate_packed([a, b])
    >>> batch["input_ids"].tolist()
    [[1, 5, 2, 1, 9, 2, 1, 6, 2, 1, 8]]
    >>> batch["labels"].tolist()
    [[-100, -100, -100, -100, 9, 2, -100, -100, -100, -100, 8]]
    >>> batch["position_ids"].tolist()
    [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]]
    >>> batch["cu_seq_lens_q"].tolist(), batch["max_length_q"], batch["num_padding"]
    ([0, 6, 11], 6, 0)
    >>> collate_packed([])["input_ids"].tolist(), collate_packed([])["num_padding"]
    ([[1]], 1)
    """
    rows = list(samples) or [EncodedSample([BOS_ID], [IGNORE_INDEX], False)]
    input_ids, labels, positions, lengths, mask = [], [], [], [], []
    for s in rows:
        input_ids += s.input_ids
        labels += [IGNORE_INDEX] + list(s.labels[1:])
        positions += range(len(s.input_ids))
        lengths.append(len(s.input_ids))
        mask += s.mask
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    batch = {
        "input_ids": torch.tensor([input_ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "num_padding": 0 if samples else 1,
        "num_samples": len(samples),
    }
    if not all(mask):
        batch["attention_mask"] = torch.tensor([mask])
    if weighting == "sample":
        starts = cu.tolist()
        batch["weights"] = target_weights(batch["labels"], [(0, a, b) for a, b in zip(starts[:-1], starts[1:])])
    return batch


def packed_micro_batches(dataset: SFTDataset, step_plan: list[list[int]],
                         weighting: str = "token") -> list[dict[str, Any]]:
    """Collated packed micro-batches of one optimizer step, each with the sample ids it holds."""
    batches = []
    for slots in step_plan:
        batch = collate_packed([dataset.samples[i] for i in slots], weighting)
        batch["sample_ids"] = [dataset.ids[i] for i in slots]
        batches.append(batch)
    return batches


def model_inputs(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The forward kwargs of a seed or a packed micro-batch, tensors moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in MODEL_INPUTS}


# ---------------------------------------------------------------------------- attention


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
    length: on an H100 (torch 2.11) each call spent ~2.7 ms of CPU time, over 100 times the 9-23
    microseconds its kernel ran. Flash and memory-efficient kernels take any length.
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
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    segments = zip(*(flat(t).split(lengths, dim=2) for t in (query, key, value)))
    keys = key_mask.reshape(-1).bool().split(lengths) if key_mask is not None else [None] * len(lengths)
    with _segment_kernels(query):
        out = torch.cat(
            [F.scaled_dot_product_attention(q, k, v, attn_mask=_segment_mask(visible, q.shape[2]), dropout_p=dropout,
                                            is_causal=visible is None, scale=scaling,
                                            enable_gqa=heads != key.shape[1])
             for (q, k, v), visible in zip(segments, keys)],
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
