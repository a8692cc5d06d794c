"""Readouts of a Patchscope run: the target's next-token distribution (top-k) and its greedy generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import PatchscopeError
from ..spec import Patchscope


@dataclass(frozen=True)
class TokenProb:
    """One entry of the next-token distribution."""

    token: str
    token_id: int
    prob: float


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token decoded as text (a few microseconds; not memoised, so no tokenizer is kept alive)."""
    return tokenizer.decode([token_id])


def show_text(text: str, width: int | None = None) -> str:
    """A token or a generation as every table, figure and page shows it: quoted as Python's ``repr`` quotes it, so
    whitespace and control characters are visible and no two texts look alike (``' Paris'``, ``'\\n'``, ``' '``).

    `width` counts the characters between the quotes (at least 1): a longer text is cut to that many, the last
    one "…" (``show_text(" Washington", 7) == "' Washi…'"``). JSON keeps the raw text.
    """
    quoted = repr(text)
    quote, inner = quoted[0], quoted[1:-1]
    if width is not None and len(inner) > width:
        inner = inner[: max(width, 1) - 1] + "…"
    return quote + inner + quote


def top_k_ids(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and ids of the k most likely next tokens, for one row or a batch of rows."""
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.topk(min(k, probs.shape[-1]), dim=-1)


def entropy_of(logits: torch.Tensor, rows_per_chunk: int = 256) -> torch.Tensor:
    """The entropy in nats of softmax(logits) over the last dimension, in float32; rows in chunks, so that its
    buffers stay at `rows_per_chunk` x vocabulary whatever the batch (the planned path's head budget)."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], device=logits.device)
    for start in range(0, flat.shape[0], rows_per_chunk):
        logp = torch.log_softmax(flat[start : start + rows_per_chunk].float(), dim=-1)
        out[start : start + rows_per_chunk] = -(logp.exp() * logp).sum(-1)
    return out.reshape(logits.shape[:-1])


def decode_top(tokenizer: Any, probs: Sequence[float], ids: Sequence[int]) -> list[TokenProb]:
    return [TokenProb(token_text(tokenizer, int(i)), int(i), float(v)) for v, i in zip(probs, ids)]


def top_k(logits: torch.Tensor, tokenizer: Any, k: int) -> list[TokenProb]:
    """The k most likely next tokens under softmax(logits), decoded as text."""
    values, ids = top_k_ids(logits, k)
    return decode_top(tokenizer, values.tolist(), ids.tolist())


@dataclass
class PatchscopeResult:
    """What the target said: its next-token distribution at the end of T and, if asked, its generation."""

    scope: Patchscope
    source_position: int  # token index i, resolved
    target_position: int  # token index i*, resolved
    top: list[TokenProb]
    generation: str | None = None
    logits: torch.Tensor | None = field(default=None, repr=False)  # None only after run(keep_logits=False)
    # False when the patch cannot reach the readout (written at the target's last layer at a position before
    # its last token, which no later layer reads): the output is the same for every source.
    informative: bool = True
    # The greedy tokens behind `generation`, up to and including EOS: what a per-step score compares, since
    # re-tokenising the text can merge tokens ("\n" "\n" -> "\n\n"). None when not generating, and on the
    # CoT (reroute) path, which records only the text.
    generated_ids: list[int] | None = None
    # Kept with run(..., keep_scores=True), what the scale search scores: the entropy (nats) of the next-token
    # distribution at the end of T (low when the readout is confident), and the target's last-layer residual (the
    # last block's output, before the final norm) at the end of T, which self-similarity compares with v.
    entropy: float | None = None
    final_state: torch.Tensor | None = field(default=None, repr=False)
    # Beside a vector reading (a `VectorSource`): the null reading, what the target prompt says with nothing written
    # (its top-k next tokens and its generation), read once per distinct target. None for a prompt's state.
    null_top: list[TokenProb] | None = None
    null_generation: str | None = None

    @property
    def agrees_with_null(self) -> bool | None:
        """Whether the reading is the null reading's: the same top-1 next token and the same generation (None
        without a null reading). A vector whose reading agrees changed nothing visible at this scale and l*."""
        if self.null_top is None:
            return None
        return self.top[0].token_id == self.null_top[0].token_id and self.generation == self.null_generation

    @property
    def token(self) -> str:
        """The top-1 next token."""
        return self.top[0].token

    @property
    def prob(self) -> float:
        return self.top[0].prob

    @property
    def kept_logits(self) -> torch.Tensor:
        """`logits`, which a run kept (its default); an error where ``run(keep_logits=False)`` dropped them."""
        if self.logits is None:
            raise PatchscopeError(
                "PatchscopeResult.logits is None: this run dropped them (allowed: run(..., "
                "keep_logits=True), the default)"
            )
        return self.logits

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.scope.to_dict(),
            "source_position": self.source_position,
            "target_position": self.target_position,
            "top": [{"token": t.token, "token_id": t.token_id, "prob": t.prob} for t in self.top],
            "generation": self.generation,
            "informative": self.informative,
            **(
                {}
                if self.null_top is None
                else {
                    "null_top": [{"token": t.token, "token_id": t.token_id, "prob": t.prob} for t in self.null_top],
                    "null_generation": self.null_generation,
                    "agrees_with_null": self.agrees_with_null,
                }
            ),
        }
