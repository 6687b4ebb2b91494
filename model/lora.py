"""Fold LoRA adapters into their base weights, for an export that ``from_pretrained`` loads.

A LoRA run's ZeRO-3 checkpoint holds peft's module names (``base_model.model.<hf name>``,
``<module>.base_layer.weight``, ``<module>.lora_A.default.weight`` ...). The merged weight is
peft's own: ``W + (alpha / r) * B @ A``. Merging happens one weight at a time, when the
exporter writes it, so memory stays bounded as for a full fine-tune.
"""

from __future__ import annotations

from typing import Any

import torch

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # peft's adapter name, the only one the trainer creates


class MergedLoraWeight:
    """``base + scale * lora_b @ lora_a``, computed only when the exporter asks for it."""

    def __init__(self, base: Any, lora_a: Any, lora_b: Any, scale: float):
        self.base, self.lora_a, self.lora_b, self.scale = base, lora_a, lora_b, scale
        self.shape, self.dtype = base.shape, base.dtype

    def contiguous(self) -> torch.Tensor:
        delta = self.lora_b.contiguous().float() @ self.lora_a.contiguous().float()
        return (self.base.contiguous().float() + self.scale * delta).to(self.dtype)


def merge_lora(state: dict[str, Any], r: int, alpha: int) -> dict[str, Any]:
    """The plain HF state dict of a peft LoRA state dict (values may be lazy, as the exporter's).

    >>> w, a, b = torch.zeros(2, 2), torch.ones(1, 2), torch.ones(2, 1)
    >>> state = {"base_model.model.q.base_layer.weight": w, "base_model.model.q.lora_A.default.weight": a,
    ...          "base_model.model.q.lora_B.default.weight": b, "base_model.model.norm.weight": w[0]}
    >>> merged = merge_lora(state, r=1, alpha=2)
    >>> sorted(merged), merged["q.weight"].contiguous().tolist()
    (['norm.weight', 'q.weight'], [[2.0, 2.0], [2.0, 2.0]])
    """
    merged = {}
    for name, value in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        hf_name = name.removeprefix(PEFT_PREFIX)
        if ".base_layer." in name:
            module, param = name.rsplit(".base_layer.", 1)
            hf_name = f"{module.removeprefix(PEFT_PREFIX)}.{param}"
            if param == "weight":
                value = MergedLoraWeight(value, state[f"{module}.lora_A.{ADAPTER}.weight"],
                                         state[f"{module}.lora_B.{ADAPTER}.weight"], alpha / r)
        merged[hf_name] = value
    return merged
