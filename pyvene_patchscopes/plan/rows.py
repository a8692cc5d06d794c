"""The execution plan of a Patchscope run: which rows share a target prompt, and the batches they run in.

A plan depends only on the specs and the token budget, never on the machine or the process count, so
that a run split over several processes computes exactly the same batches as a run in one process.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from ..errors import check_int

# Tokens of context a batch may hold: rows x (target length + new tokens). 32k tokens of SmolLM2 cost
# about 1.5 GB with 20 generated tokens (the per-row key/value cache), far less for next-token readouts.
DEFAULT_MAX_BATCH_TOKENS = 32768
# The head's buffers grow with rows x vocabulary, not with tokens: a batch may hold this many float32 logits
# per token of its budget. Each head buffer (the logits, their softmax) then stays under
# 4 B x 1,024 x max_batch_tokens whatever the vocabulary: 134 MB at the default budget, 4.3 GB at 1,048,576
# (8,372 rows of a 128k vocabulary, where counting tokens alone would allow 50,000 rows and 26 GB per buffer).
HEAD_ELEMENTS_PER_TOKEN = 1024


@dataclass(frozen=True)
class TargetGroup:
    """Rows that patch the same target prompt at the same position(s), in one write mode: they share the prompt's
    prefix. `position` is the first slot; `slots` all of them (empty for the usual one)."""

    model: str
    prompt: str
    position: int
    max_new_tokens: int
    rows: tuple[int, ...]
    slots: tuple[int, ...] = ()
    mode: str = "replace"


def group_by_target(keys: Sequence[tuple]) -> list[TargetGroup]:
    """Group row indices by (target model, target prompt, target position, max_new_tokens[, slots, write mode]), in
    first-seen order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for row, key in enumerate(keys):
        groups[key].append(row)
    return [TargetGroup(key[0], key[1], key[2], key[3], tuple(rows), *key[4:]) for key, rows in groups.items()]


def check_budget(max_batch_tokens: int) -> int:
    return check_int("max_batch_tokens", max_batch_tokens)


def rows_per_batch(tokens_per_row: int, max_batch_tokens: int, vocab: int = 0) -> int:
    """How many rows one batch holds: at most `max_batch_tokens` tokens, and at most
    ``HEAD_ELEMENTS_PER_TOKEN x max_batch_tokens`` logits (rows x `vocab`); one row at least."""
    size = max_batch_tokens // max(1, tokens_per_row)
    if vocab:
        size = min(size, max_batch_tokens * HEAD_ELEMENTS_PER_TOKEN // vocab)
    return max(1, size)


def pack(
    rows: Sequence[int], layers: Sequence[int], tokens_per_row: int, max_batch_tokens: int, vocab: int = 0
) -> list[list[int]]:
    """Batches of rows, sorted by target layer, each within the budget of `rows_per_batch`."""
    check_budget(max_batch_tokens)
    size = rows_per_batch(tokens_per_row, max_batch_tokens, vocab)
    ordered = [row for _, row in sorted(zip(layers, rows))]
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


__all__ = [
    "TargetGroup",
    "group_by_target",
    "pack",
    "rows_per_batch",
    "HEAD_ELEMENTS_PER_TOKEN",
    "check_budget",
    "DEFAULT_MAX_BATCH_TOKENS",
]
