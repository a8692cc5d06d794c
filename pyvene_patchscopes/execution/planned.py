"""The one driver of the planned execution, used by `run`, `sweep` and the evaluations.

Given rows that patch one target prompt at one position (each row: a vector, its l*, whether it is
written after the final norm), it runs the prompt once (`Stack.share`), packs the rows under the token
budget (`plan.pack`), and patches each batch from its rows' l* up (`Stack.patched`). It returns tensors
(top-k ids and probabilities, optionally full logits) and generated token ids; callers build results.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import PatchscopeError, SlowPathWarning
from ..models.parts import weight_of
from ..plan.rows import pack
from ..result import entropy_of, top_k_ids
from ..spec.writes import REPLACE_ONE, Slots
from .check import planned_reason, stack_for
from .stack import Shared, Stack, evaluating


@dataclass
class TargetRows:
    """Rows that patch one target prompt (token ids) at one position i*."""

    ids: torch.Tensor  # [T] the target prompt's token ids
    position: int  # i*
    layers: torch.Tensor  # [rows] l* of each row
    after_norm: torch.Tensor  # [rows] bool: written after the final norm (skip_final_ln)
    vectors: Callable[[torch.Tensor], torch.Tensor]  # row indices -> f(h) written there, [n, d] or [n, slots, d]
    max_new_tokens: int = 0
    slots: Slots = REPLACE_ONE  # the slots written (offsets from i*) and the write mode
    alphas: torch.Tensor | None = None  # [rows] each row's α (None: 1)
    keep_scores: bool = False  # also return entropy, and the last block output at the end of T

    @property
    def n_rows(self) -> int:
        return int(self.layers.shape[0])


@dataclass
class Readout:
    """What the rows produced: top-k per row, full logits when kept, greedy token ids when generating."""

    top_probs: torch.Tensor  # [rows, k]
    top_ids: torch.Tensor  # [rows, k]
    logits: torch.Tensor | None  # [rows, vocab], float32, on the CPU
    tokens: list[list[int]] | None  # per row, up to and including EOS
    entropy: torch.Tensor | None = None  # [rows] nats, of the next-token distribution
    states: torch.Tensor | None = None  # [rows, d] the last block's output at the end of T, when kept


class SharedPrompts:
    """The shared pass of the last target prompt seen, kept while rows for it keep coming (one at a time)."""

    def __init__(self) -> None:
        self.seen: tuple[tuple, Shared] | None = None  # (model, prompt ids, position), its shared pass

    def get(self, stack: Stack, rows: TargetRows) -> Shared:
        key = (id(stack.model), tuple(rows.ids.tolist()), rows.position)
        if self.seen is None or self.seen[0] != key:
            self.seen = key, stack.share(rows.ids, rows.position)
        return self.seen[1]


def use_planned(model: nn.Module, requested: bool = True) -> bool:
    """Whether `model` runs the planned execution; warns when it was asked for and the family cannot take it.

    Python's warning filter shows the warning once per model class and call site, not once per call.
    """
    if not requested:
        return False
    why = planned_reason(model)
    if not why:
        return True
    warnings.warn(
        f"{type(model).__name__} runs on the plain pyvene path, which is slower than the planned execution: {why}",
        SlowPathWarning,
        stacklevel=3,
    )
    return False


def _planned_stack(model: nn.Module) -> Stack:
    """`stack_for(model)`, for a caller that chose the planned execution: an error where `model` runs plainly."""
    stack = stack_for(model)
    if stack is None:
        raise PatchscopeError(
            f"{type(model).__name__} has no planned execution here (allowed: the plain pyvene path, planned=False)"
        )
    return stack


def run_planned(
    model: nn.Module,
    rows: TargetRows,
    top: int,
    max_batch_tokens: int,
    eos_token_id: int | None,
    keep_logits: bool = True,
    shared: SharedPrompts | None = None,
    on_batch: Callable[[int], None] | None = None,
    pad_token_id: int | None = None,
) -> Readout:
    """Patch every row of `rows` in `model` (its planned execution, `use_planned`) and read the end of the target
    prompt (and greedy tokens)."""
    stack = _planned_stack(model)
    shared = shared if shared is not None else SharedPrompts()
    vocab = weight_of(stack.lm_head).shape[0]
    top = min(top, vocab)
    n = rows.n_rows
    top_probs, top_ids = torch.empty(n, top), torch.empty(n, top, dtype=torch.long)
    logits_out = torch.empty(n, vocab) if keep_logits else None
    entropy = torch.empty(n) if rows.keep_scores else None
    states: torch.Tensor | None = None
    tokens: list[list[int]] | None = [[] for _ in range(n)] if rows.max_new_tokens else None
    tokens_per_row = len(rows.ids) + rows.max_new_tokens
    with evaluating(stack.model), torch.no_grad():
        prompt_pass = shared.get(stack, rows)
        for batch in pack(range(n), rows.layers.tolist(), tokens_per_row, max_batch_tokens, vocab):
            index = torch.tensor(batch)
            decoded = stack.patched(
                prompt_pass,
                rows.vectors(index),
                rows.layers[index],
                max_new_tokens=rows.max_new_tokens,
                eos_token_id=eos_token_id,
                after_norm=rows.after_norm[index],
                pad_token_id=pad_token_id,
                slots=rows.slots,
                alphas=None if rows.alphas is None else rows.alphas[index],
                keep_states=rows.keep_scores,
            )
            probs, ids = top_k_ids(decoded.logits, top)
            if entropy is not None:
                entropy[index] = entropy_of(decoded.logits).cpu()
            if decoded.states is not None:
                if states is None:
                    states = torch.empty(n, decoded.states.shape[-1])
                states[index] = decoded.states.float().cpu()
            top_probs[index], top_ids[index] = probs.cpu(), ids.cpu()
            if logits_out is not None:
                logits_out[index] = decoded.logits.cpu()
            if tokens is not None and decoded.tokens is not None:
                for k, row in enumerate(batch):
                    tokens[row] = decoded.tokens[k]
            if on_batch is not None:
                on_batch(len(batch))
    return Readout(top_probs, top_ids, logits_out, tokens, entropy, states)


__all__ = ["TargetRows", "Readout", "SharedPrompts", "run_planned", "use_planned"]
