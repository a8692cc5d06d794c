"""Batches of prompts: left-padded token ids with explicit position ids, so padding changes nothing.

A model whose forward takes no ``position_ids`` (TrOCR's learned positions, BLOOM, Mamba) would read left
padding as tokens, so its prompts are batched only with prompts of the same length (`exact_groups`).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
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
        pad = left_pads(mask)
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": mask, "position_ids": position_ids}
        return cls({k: v.to(handle.device) for k, v in inputs.items()}, pad)


def left_pads(attention_mask: torch.Tensor) -> list[int]:
    """Each row's left padding in a batch, read off its attention mask (`Batch.pad`)."""
    return (attention_mask.shape[1] - attention_mask.sum(-1)).tolist()


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pads_exactly(handle: ModelHandle) -> bool:
    """Whether left padding changes nothing for this model: its forward takes the explicit position ids."""
    return "position_ids" in inspect.signature(handle.model.forward).parameters


def exact_groups(handle: ModelHandle, prompts: Sequence[str]) -> list[list[int]]:
    """Indices of `prompts` that may share a padded batch: all of them, or those of one token length each."""
    if pads_exactly(handle) or len(set(prompts)) <= 1:
        return [list(range(len(prompts)))]
    groups: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[len(handle.tokenizer(prompt, add_special_tokens=True)["input_ids"])].append(index)
    return list(groups.values())


def exact_chunks(handle: ModelHandle, prompts: Sequence[str], size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of at most `size` whose left padding changes nothing (`exact_groups`)."""
    return [list(chunk) for group in exact_groups(handle, prompts) for chunk in chunks(group, size)]


__all__ = ["Batch", "chunks", "exact_chunks", "exact_groups", "left_pads", "pads_exactly"]
