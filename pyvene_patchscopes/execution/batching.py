"""Batches of prompts: left-padded token ids with explicit position ids, so padding changes nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..models import ModelHandle


@dataclass
class Batch:
    """Left-padded token ids for some prompts, with explicit position ids so padding changes nothing."""

    inputs: dict[str, torch.Tensor]
    pad: list[int]  # left-padding per row: unpadded index i sits at pad + i

    @classmethod
    def encode(cls, handle: ModelHandle, prompts: Sequence[str]) -> "Batch":
        encoded = handle.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True)
        mask = encoded["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        pad = (mask.shape[1] - mask.sum(-1)).tolist()
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": mask, "position_ids": position_ids}
        return cls({k: v.to(handle.device) for k, v in inputs.items()}, pad)


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


__all__ = ["Batch", "chunks"]
