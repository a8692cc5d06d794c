"""The planned execution for families whose logits come from more than a norm and an unembedding.

ModernBERT's decoder runs a prediction head of its own layers before its unembedding; Inkling 2 combines every
block's output (block attention residuals) before its final norm. Neither can be read by unembedding the last
block's output, so here the model's own forward runs the rows, one forward per l*, with the blocks up to l*
replaying the outputs recorded on the unpatched prompt instead of computing them. Rows are written at i* by
hooks, as the plain path writes them, and everything after the last block is the model's own. The saving is
the blocks below each row's l* and pyvene's overhead; `check.probe` holds each model to hand-written hooks.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..models.parts import weight_of
from ..models.probes import hooks_restored
from ..spec.writes import REPLACE_ONE, Slots
from .layered import Recorded, hidden_of, patched_greedy, record_blocks, writing
from .stack import Decoded, Stack


def _rows(value: Any, rows: int) -> Any:
    """A recorded block output for `rows` rows: its tensors expanded along the batch, the rest as recorded."""
    if isinstance(value, torch.Tensor):
        return value.expand(rows, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_rows(v, rows) for v in value)
    return value


class Replayed(Stack):
    """Rows run through the model's own forward, one forward per l*; the blocks up to l* replay the unpatched
    outputs."""

    @torch.no_grad()
    def share(self, input_ids: torch.Tensor, split: int) -> Recorded:  # type: ignore[override]  # records every block: Recorded
        ids = input_ids.to(self.device)
        return Recorded(ids, split, *record_blocks(self.model, self.layers, ids[None]))

    @contextmanager
    def _replaying(self, shared: Recorded, below: int, rows: int) -> Iterator[None]:
        """Blocks 0 .. below-1 return their recorded outputs for the duration (their own forward restored after)."""
        replaced = []
        try:
            for j in range(below):
                block = self.layers[j]
                block.forward = lambda *args, _out=shared.outputs[j], **kwargs: _rows(_out, rows)
                replaced.append(block)
            yield
        finally:
            for block in replaced:
                del block.forward

    @property
    def _last_only(self) -> dict[str, int]:
        """Logits at the last position only, where the model's forward can be asked (as the plain path asks)."""
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}

    def norm_site(self) -> nn.Module | None:
        """Where a row written after the final norm goes (as the plain path's site): the norm's output, if any."""
        arch = self.arch
        return None if arch.final_norm is None or arch.final_norm_shared else arch.module(self.model, arch.final_norm)

    @torch.no_grad()
    def patched(  # type: ignore[override]  # reads a Recorded, not a Shared
        self,
        shared: Recorded,
        vectors: torch.Tensor,
        layers: torch.Tensor,
        max_new_tokens: int = 0,
        eos_token_id: int | None = None,
        after_norm: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        slots: Slots = REPLACE_ONE,
        alphas: torch.Tensor | None = None,
        keep_states: bool = False,
    ) -> Decoded:
        rows, layers = vectors.shape[0], layers.cpu()
        norm = self.norm_site()
        if norm is None and after_norm is not None:  # no norm to write after: the last block's output, as plain
            layers, after_norm = torch.where(after_norm.cpu(), self.n_layers - 1, layers), None
        after_norm, key = self.row_keys(layers, after_norm)
        vectors = vectors.to(self.device, self.dtype)
        vocab, width = weight_of(self.lm_head).shape
        logits = torch.empty(rows, vocab, device=self.device)
        states = torch.empty(rows, width, device=self.device, dtype=self.dtype) if keep_states else None
        at = shared.length - 1  # the end of T, where the readout is
        for value in sorted(set(key.tolist())):  # one forward per l*: the blocks up to it replayed
            group = torch.nonzero(key == value).flatten()
            sequence = shared.input_ids[None].repeat(len(group), 1)
            with (
                hooks_restored(self.model),
                self._replaying(shared, min(value + 1, self.n_layers), len(group)),
                writing(
                    self,
                    shared.split,
                    vectors[group],
                    layers[group],
                    after_norm[group],
                    norm,
                    slots,
                    None if alphas is None else alphas[group.to(alphas.device)],
                ),
            ):
                seen = _Seen(self.layers[-1], at) if keep_states else None
                out = self.model(input_ids=sequence, use_cache=False, **self._last_only)
            logits[group.to(self.device)] = out.logits[:, -1].float()
            if seen is not None and states is not None:
                seen.handle.remove()
                states[group.to(self.device)] = seen.kept()
        tokens = None
        if max_new_tokens:
            tokens = patched_greedy(
                self,
                shared.input_ids,
                shared.split,
                vectors,
                layers,
                after_norm,
                max_new_tokens,
                eos_token_id,
                pad_token_id,
                norm,
                slots,
                alphas,
            )
        return Decoded(logits, tokens, states)


class _Seen:
    """A forward hook that keeps a block's output at one position (the first pass over the prompt)."""

    def __init__(self, module: nn.Module, position: int) -> None:
        self.value: torch.Tensor | None = None
        self.position = position
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, out: Any) -> None:
        hidden = hidden_of(out)
        if self.value is None and hidden.shape[1] > self.position:
            self.value = hidden[:, self.position].detach().clone()

    def kept(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError(f"the block's forward never reached position {self.position} (a pass too short)")
        return self.value


__all__ = ["Replayed"]
