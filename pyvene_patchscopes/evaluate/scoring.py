"""Scoring functions of the paper's evaluations, pure and model-free so they can be tested on hand-made cases."""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from ..errors import SpecError


def rate(values: Sequence[bool]) -> float:
    """The share of True values (NaN for none: an empty cell is unknown, not zero)."""
    return sum(values) / len(values) if values else float("nan")


def precision_at_1(patched_logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
    """Per row, 1.0 when the patched argmax equals the source model's own argmax (paper §4.1, `prec_1`)."""
    return (patched_logits.argmax(-1) == source_logits.argmax(-1)).float()


def surprisal(patched_logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
    """Per row, -log p_source(argmax of the patched logits), in nats (the official code's surprisal)."""
    log_probs = torch.log_softmax(source_logits.float(), dim=-1)
    return -log_probs.gather(-1, patched_logits.argmax(-1, keepdim=True)).squeeze(-1)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).casefold()


def object_in_generation(generation: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """The attribute test: the object (or an alias) appears in the generation as whole words.

    The official code removes spaces and tests for a substring; whole words, ignoring case and runs of
    whitespace (a plural "s" allowed), keep that rule while refusing "euro" in "European" and "red" in "bored".
    """
    for candidate in (answer, *aliases):
        words = candidate.split()
        if not words:
            continue
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?:e?s)?(?!\w)"
        if re.search(pattern, generation, flags=re.IGNORECASE):
            return True
    return False


def cut_at_next_example(generation: str, separators: Sequence[str] = ("\n", ",")) -> str:
    """The generation up to the first separator: the few-shot prompt's next example is not the answer."""
    cut = len(generation)
    for separator in separators:
        index = generation.find(separator, 1 if generation.startswith(separator) else 0)
        if index >= 0:
            cut = min(cut, index)
    return generation[:cut]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts on lower-cased word tokens (longest common subsequence)."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def same_token(token_a: str, token_b: str) -> bool:
    """Cross-vocabulary Precision@1: two decoded tokens count as the same when equal up to outer spaces."""
    return token_a.strip() == token_b.strip() and bool(token_a.strip())


def auroc(scores: Sequence[float], right: Sequence[bool]) -> float:
    """The area under the ROC curve of `scores` for `right`: the chance that a random right item scores above a random
    wrong one, ties counting half (the Mann-Whitney U over the product of the two counts); NaN with only one class."""
    n_right = sum(1 for r in right if r)
    n_wrong = len(right) - n_right
    if n_right == 0 or n_wrong == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda k: scores[k])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):  # tied scores share the mean of their ranks (1-based)
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for k in order[start : end + 1]:
            ranks[k] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = sum(rank for rank, r in zip(ranks, right) if r)
    return (rank_sum - n_right * (n_right + 1) / 2) / (n_right * n_wrong)


def precision_recall(predicted: Sequence[bool], right: Sequence[bool]) -> tuple[float, float]:
    """Precision (the share of predicted items that are right) and recall (the share of right items predicted); NaN
    where nothing is predicted or nothing is right."""
    hits = sum(1 for p, r in zip(predicted, right) if p and r)
    return hits / sum(predicted) if any(predicted) else float("nan"), hits / sum(right) if any(right) else float("nan")


def best_threshold(scores: Sequence[float], right: Sequence[bool]) -> float:
    """The threshold t that maximises the F1 of "score >= t" for `right`, over the scores themselves (ties: the highest
    t); what the verify evaluation chooses on its dev split and scores on its test split."""
    best, chosen = -1.0, float("inf")
    for t in sorted(set(scores), reverse=True):
        precision, recall = precision_recall([s >= t for s in scores], right)
        f1 = (
            0.0
            if precision != precision or recall != recall or precision + recall == 0
            else 2 * precision * recall / (precision + recall)
        )
        if f1 > best:
            best, chosen = f1, t
    return chosen


def first_word_id(tokenizer: Any, text: str) -> int | None:
    """The id of the first token of `text` that spells something (its decoded text is not blank), None when none
    does. A tokenizer with a dummy prefix (Llama 2, Mistral) encodes " Paris" as ['▁', '▁Paris']: its first id, the
    lone '▁', begins every word, so a readout whose top token is that space would name every object."""
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if tokenizer.decode([token]).strip():
            return token
    return None


def saturation_layer(is_answer: Sequence[bool]) -> int | None:
    """The first layer from which the answer stays the top-1 readout up to the last layer, or None."""
    layer = None
    for index in range(len(is_answer) - 1, -1, -1):
        if not is_answer[index]:
            break
        layer = index
    return layer


def starts_word(token: str, word: str) -> bool:
    """Whether a decoded token is `word` or its first piece (at least 3 characters, so " W" is not Warsaw)."""
    piece, whole = _squash(token), _squash(word)
    return bool(piece) and (whole in piece or (len(piece) >= 3 and whole.startswith(piece)))


def stages(readouts: Sequence[str], argument: str, answer: str) -> list[str]:
    """Label each source layer's top-1 readout: 'answer', 'argument' or 'other' (Merullo et al.'s stages)."""
    return [
        "answer" if starts_word(token, answer) else "argument" if starts_word(token, argument) else "other"
        for token in readouts
    ]


MISSING = -1  # no token at this step: the generation stopped (EOS) before it; never a hit


def pad_ids(rows: Sequence[Sequence[int]] | torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] token ids: each row cut to its first k ids, a shorter row padded with `MISSING`."""
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist()
    return torch.tensor(
        [[int(t) for t in row[:k]] + [MISSING] * (k - len(row[:k])) for row in rows], dtype=torch.long
    ).reshape(len(rows), k)


def future_hits(
    guesses: Sequence[Sequence[int]] | torch.Tensor, reference: Sequence[Sequence[int]] | torch.Tensor, k: int
) -> torch.Tensor:
    """[n, k] bool: whether the guess for the token j + 1 steps ahead is the reference token there (the Future
    Lens's Precision@1 per step, Pal et al. 2023). Rows may be ragged; a missing guess or reference is a miss."""
    g, r = pad_ids(guesses, k), pad_ids(reference, k)
    if g.shape != r.shape:
        raise SpecError(
            f"future_hits: {g.shape[0]} rows of guesses for {r.shape[0]} references (allowed: one "
            "row of guesses per reference)"
        )
    return (g == r) & (g != MISSING)


def repeat_guess(top1: Sequence[int] | torch.Tensor, k: int) -> torch.Tensor:
    """[n, k]: one token per row guessed for every future step (the logit lens's bigram-style baseline)."""
    return torch.as_tensor(top1, dtype=torch.long).reshape(-1, 1).expand(-1, k).clone()


__all__ = [
    "precision_at_1",
    "surprisal",
    "object_in_generation",
    "cut_at_next_example",
    "rouge_l",
    "same_token",
    "auroc",
    "precision_recall",
    "best_threshold",
    "first_word_id",
    "saturation_layer",
    "starts_word",
    "stages",
    "MISSING",
    "pad_ids",
    "future_hits",
    "repeat_guess",
]
