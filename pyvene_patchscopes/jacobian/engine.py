"""Jacobian Scopes through pyvene: one forward pass per batch of texts, one backward pass per output direction.

The pyvene config has two interventions on the model's own modules:

1. an ``AdditionIntervention`` on the embedding output at every position, fed a zero tensor ``delta``
   [B, T, d] that requires grad: the forward pass is unchanged, and ∂/∂delta_t is ∂/∂x_t;
2. a ``CollectIntervention`` on the final norm's output at the prediction position: y, still in the graph.

A score needs vᵀJ_t for a few directions v in y-space (the target token's unembedding row, ŷ, the
Fisher factor rows), so each direction is one vector-Jacobian product ``autograd.grad(y, delta, v)``;
many directions go through one batched backward (``is_grads_batched``). J itself is never formed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Sequence, overload

import pyvene as pv
import torch
from tqdm.auto import tqdm

from ..compat import intervenable, pyvene_guard
from ..errors import PatchscopeError, SpecError, check_int
from ..models import ModelHandle
from ..models.architectures import architecture
from ..models.order import data_first
from ..models.sites import BLOCK_OUTPUT, final_norm, final_norm_path
from ..plan.batching import Batch, chunks
from ..resolve import check_context
from ..result import token_text
from ..spec.checks import check_text
from .fisher import fisher_factors, head_rows, head_weight, logits, scale, slopes
from .result import Attribution
from .spec import JacobianScope, TargetToken

DIRECTION_CHUNK = 32  # directions per batched backward: bounds memory for the exact Fisher form


def embedding_path(model: torch.nn.Module) -> str:
    """Dotted path of the token embedding, whose output is what the first block receives per token (plus
    learned positions in GPT-2, added after it: a gradient there equals the gradient at the sum)."""
    return architecture(model).embed


def attribution_config(model: torch.nn.Module, hidden_size: int, n_positions: int) -> pv.IntervenableConfig:
    """Add ``delta`` at the embedding output (all positions); collect y after the final norm (one position)."""
    return pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=0,
                component=f"{embedding_path(model)}.output",
                unit="pos",
                max_number_of_units=n_positions,
                intervention=pv.AdditionIntervention(embed_dim=hidden_size),
            ),
            _y_site(model, hidden_size),
        ]
    )


def _y_site(model: torch.nn.Module, hidden_size: int) -> pv.RepresentationConfig:
    """Where y is read: the final norm's output; the last block's where nothing runs between it and the head
    (TrOCR, GIT) or where the final norm also runs before the blocks (NanoChat: its one site would fire twice)."""
    collect = dict(unit="pos", max_number_of_units=1, intervention=pv.CollectIntervention(embed_dim=hidden_size))
    arch = architecture(model)
    if arch.final_norm is None:
        last = len(arch.blocks(model)) - 1
        return pv.RepresentationConfig(layer=last, component=BLOCK_OUTPUT, **collect)
    if arch.final_norm_shared:  # the last block's output; `forward` applies the norm to it
        last = len(arch.blocks(model)) - 1
        return pv.RepresentationConfig(layer=last, component=BLOCK_OUTPUT, **collect)
    return pv.RepresentationConfig(layer=0, component=f"{final_norm_path(model)}.output", **collect)


@dataclass
class Rows:
    """A padded batch, with each row's prediction column and the columns it scores."""

    batch: Batch
    columns: list[int]  # the prediction position of each row, as a padded column
    scored: list[list[int]]  # padded columns of the row's own tokens up to the prediction (no prefix, no padding)

    @property
    def width(self) -> int:
        return int(self.batch.inputs["input_ids"].shape[1])

    def locations(self) -> dict:
        """Canonical nested unit_locations: every column for the addition, the prediction column for y."""
        every = list(range(self.width))
        return {"sources->base": (None, [[every for _ in self.columns], [[c] for c in self.columns]])}


def check_texts(texts: Sequence[str]) -> None:
    """Non-empty, valid Unicode (their length is checked by `prepare`, which tokenizes them)."""
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"text={text!r} is not allowed (allowed: a non-empty string)")
        check_text("text", text)


def prepare(handle: ModelHandle, texts: Sequence[str], target_position: int) -> Rows:
    """Encode `texts` (left-padded) and check their lengths and the prediction position against each one."""
    check_texts(texts)
    batch = Batch.encode(handle, texts)
    special = handle.tokenizer(
        list(texts), padding=True, add_special_tokens=True, return_special_tokens_mask=True, return_tensors="pt"
    )["special_tokens_mask"]
    columns, scored = [], []
    width = batch.inputs["input_ids"].shape[1]
    for row, (text, pad) in enumerate(zip(texts, batch.pad)):
        n = width - pad
        check_context(handle, "text", n)
        if not -n <= target_position < n:
            raise SpecError(
                f"target_position={target_position} is out of range for {text!r} ({n} tokens; allowed: {-n}..{n - 1})"
            )
        column = pad + target_position % n
        own = [c for c in range(pad, column + 1) if not special[row, c]]
        if not own or special[row, column]:
            raise SpecError(
                f"target_position={target_position} is the tokenizer's special token "
                f"{handle.tokenizer.convert_ids_to_tokens(int(batch.inputs['input_ids'][row, column]))!r}"
                f" in {text!r} (allowed: the position of one of the text's own tokens)"
            )
        columns.append(column)
        scored.append(own)
    return Rows(batch, columns, scored)


def resolve_target_token(handle: ModelHandle, token: TargetToken) -> int | None:
    """A target token given as text or id -> its id (None stays None: the prediction)."""
    if token is None:
        return None
    vocab = handle.model.get_output_embeddings().weight.shape[0]  # the shape is known even when offloaded
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise SpecError(
                f"JacobianScope.target_token={token} is out of range for {handle.name} (allowed: 0..{vocab - 1})"
            )
        return token
    ids = handle.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = handle.tokenizer.convert_ids_to_tokens(ids)
        raise SpecError(
            f"JacobianScope.target_token={token!r} is {len(ids)} tokens for {handle.name} {pieces} "
            "(allowed: text that is a single token, e.g. with its leading space, or a token id)"
        )
    return int(ids[0])


def check_scope(handle: ModelHandle, scope: JacobianScope) -> None:
    if scope.model != handle.name:
        raise SpecError(
            f"JacobianScope.model={scope.model!r} is not the model given ({handle.name!r}); "
            "build the spec with model=handle.name"
        )
    if scope.variant == "fisher" and scope.fisher == "low-rank" and scope.rank > handle.hidden_size:
        raise SpecError(
            f"JacobianScope.rank={scope.rank} is out of range for {handle.name} (allowed: 1..{handle.hidden_size})"
        )
    resolve_target_token(handle, scope.target_token)


# ---- the pass ------------------------------------------------------------------------------------
@dataclass
class Forward:
    """One forward pass with delta in the graph: y, the head's view of it, and the embeddings x."""

    delta: torch.Tensor  # [B, T, d], zeros, requires grad
    y: torch.Tensor  # [B, d], after the final norm, at the prediction position
    z: torch.Tensor  # [B, V] float32 logits of y
    x: torch.Tensor  # [B, T, d] the embedding output (what delta is added to)


def pullback(forward: Forward, directions: torch.Tensor, progress: bool = False) -> Iterator[torch.Tensor]:
    """vᵀ ∂y/∂delta for directions [k, B, d], in chunks: yields [k', B, T, d] (one backward per direction)."""
    parts = directions.split(DIRECTION_CHUNK)
    for chunk in tqdm(parts, desc="directions", unit="chunk", leave=False, disable=not progress):
        chunk = chunk.to(forward.y.dtype)
        try:
            if len(chunk) == 1:
                grad = torch.autograd.grad(forward.y, forward.delta, chunk[0], retain_graph=True)[0].unsqueeze(0)
            else:
                grad = torch.autograd.grad(forward.y, forward.delta, chunk, retain_graph=True, is_grads_batched=True)[0]
        except RuntimeError as err:
            if "inplace operation" not in str(err):
                raise
            raise PatchscopeError(
                "Jacobian Scopes differentiate the model's forward, and autograd cannot: its forward "
                "overwrites a tensor it needs for the gradient in place (RWKV's recurrent state)"
            ) from None
        yield grad


def _compute_dtype(handle: ModelHandle) -> torch.dtype:
    return torch.float64 if handle.dtype == torch.float64 else torch.float32


def scores_for(
    handle: ModelHandle, scope: JacobianScope, forward: Forward, target_ids: torch.Tensor, progress: bool = False
) -> torch.Tensor:
    """The scope's score for every column of every row: [B, T] (float32, or float64 for a float64 model)."""
    dtype = _compute_dtype(handle)
    if scope.variant == "temperature":
        y = forward.y.detach().to(dtype)
        grad = next(pullback(forward, (y / y.norm(dim=-1, keepdim=True)).unsqueeze(0)))[0].to(dtype)
        return grad.norm(dim=-1)
    factor, slope = scale(handle.model), slopes(handle.model, forward.z, dtype)
    with head_weight(handle.model) as weight:  # streamed in vocabulary chunks, loaded by accelerate if offloaded
        if scope.variant in ("semantic", "gradient-x-input"):
            direction = head_rows(weight, target_ids, dtype, factor, slope)
        else:
            p = torch.softmax(forward.z.to(dtype), dim=-1)
            factors = fisher_factors(weight, p, scope.fisher, scope.rank, dtype, factor, slope)  # [k, B, d]
    if scope.variant in ("semantic", "gradient-x-input"):
        grad = next(pullback(forward, direction.unsqueeze(0).to(forward.y.device)))[0].to(dtype)
        if scope.variant == "semantic":
            return grad.norm(dim=-1)
        return (grad * forward.x.to(dtype)).norm(dim=-1)
    total = torch.zeros(forward.delta.shape[:2], dtype=dtype, device=forward.delta.device)
    for grad in pullback(forward, factors.to(forward.y.device), progress=progress):
        total += (grad.to(dtype) ** 2).sum(dim=(0, -1))
    return total


def _forward(handle: ModelHandle, pvm: pv.IntervenableModel, rows: Rows) -> Forward:
    model = handle.model
    delta = torch.zeros(
        len(rows.columns), rows.width, handle.hidden_size, dtype=handle.dtype, device=handle.device, requires_grad=True
    )
    (_, collected), _ = pvm(
        base={**rows.batch.inputs, "logits_to_keep": 1},
        unit_locations=rows.locations(),
        source_representations={pvm.sorted_keys[0]: delta},
    )
    y = collected[0].reshape(len(rows.columns), handle.hidden_size)
    arch = architecture(model)
    if arch.final_norm_shared:
        y = final_norm(model)(y)
    with torch.no_grad():
        x = model.get_input_embeddings()(rows.batch.inputs["input_ids"])
    return Forward(delta=delta, y=y, z=logits(model, y), x=x)


@data_first("model", "texts", "scopes")
def attribute(
    texts: Sequence[str],
    model: ModelHandle,
    scopes: Sequence[JacobianScope],
    batch_size: int = 8,
    progress: bool | None = None,
) -> list[list[Attribution]]:
    """Every scope on every text: ``result[s][r]`` is scope s on text r. Scopes with one prediction
    position share the forward pass of each batch."""
    texts = list(texts)
    if not texts:
        raise SpecError("texts is empty (allowed: one text or more)")
    check_texts(texts)  # before any work; lengths and positions are checked per batch by `prepare`
    batch_size = check_int("batch_size", batch_size)
    for scope in scopes:
        check_scope(model, scope)
    by_position: dict[int, list[int]] = defaultdict(list)
    for s, scope in enumerate(scopes):
        by_position[scope.target_position].append(s)
    found: dict[tuple[int, int], Attribution] = {}  # (scope, text) -> its attribution
    batches = [(position, chunk) for position in by_position for chunk in chunks(list(range(len(texts))), batch_size)]
    show = progress if progress is not None else len(batches) > 2
    exact = any(scopes[s].variant == "fisher" and scopes[s].fisher == "exact" for s in range(len(scopes)))
    with pyvene_guard(model.model), torch.enable_grad():
        for position, chunk in tqdm(batches, desc="jacobian scopes", unit="batch", disable=not show):
            rows = prepare(model, [texts[r] for r in chunk], position)
            pvm = intervenable(attribution_config(model.model, model.hidden_size, rows.width), model.model)
            forward = _forward(model, pvm, rows)
            probs = torch.softmax(forward.z.detach(), dim=-1)
            predictions = probs.argmax(dim=-1)
            for s in by_position[position]:
                scope = scopes[s]
                given = resolve_target_token(model, scope.target_token)
                target_ids = predictions if given is None else torch.full_like(predictions, given)
                scores = scores_for(model, scope, forward, target_ids, progress=exact and show).detach().cpu()
                for k, r in enumerate(chunk):
                    found[s, r] = _attribution(model, texts[r], scope, rows, k, scores[k], probs[k], target_ids[k])
            del forward  # frees the retained graph before the next batch
    return [[found[s, r] for r in range(len(texts))] for s in range(len(scopes))]


def _attribution(
    handle: ModelHandle,
    text: str,
    scope: JacobianScope,
    rows: Rows,
    k: int,
    scores: torch.Tensor,
    probs: torch.Tensor,
    target_id: torch.Tensor,
) -> Attribution:
    ids = rows.batch.inputs["input_ids"][k]
    pad = rows.batch.pad[k]
    prediction = int(probs.argmax())
    return Attribution(
        text=text,
        scope=scope,
        tokens=tuple(token_text(handle.tokenizer, int(ids[c])) for c in rows.scored[k]),
        positions=tuple(c - pad for c in rows.scored[k]),
        scores=tuple(float(scores[c]) for c in rows.scored[k]),
        target_position=rows.columns[k] - pad,
        prediction=token_text(handle.tokenizer, prediction),
        prediction_id=prediction,
        prediction_prob=float(probs[prediction]),
        target_token=token_text(handle.tokenizer, int(target_id)),
        target_id=int(target_id),
    )


@overload
def jacobian_scope(
    text: str,
    model: ModelHandle,
    variant: str | JacobianScope = ...,
    target_position: int = ...,
    target_token: TargetToken = ...,
    fisher: str = ...,
    rank: int = ...,
    batch_size: int = ...,
    progress: bool | None = ...,
) -> Attribution: ...


@overload
def jacobian_scope(
    text: list[str] | tuple[str, ...],
    model: ModelHandle,
    variant: str | JacobianScope = ...,
    target_position: int = ...,
    target_token: TargetToken = ...,
    fisher: str = ...,
    rank: int = ...,
    batch_size: int = ...,
    progress: bool | None = ...,
) -> list[Attribution]: ...


@overload
def jacobian_scope(
    text: str | Sequence[str],
    model: ModelHandle,
    variant: str | JacobianScope = ...,
    target_position: int = ...,
    target_token: TargetToken = ...,
    fisher: str = ...,
    rank: int = ...,
    batch_size: int = ...,
    progress: bool | None = ...,
) -> Attribution | list[Attribution]: ...


@data_first("model", "text")
def jacobian_scope(
    text: str | Sequence[str],
    model: ModelHandle,
    variant: str | JacobianScope = "fisher",
    target_position: int = -1,
    target_token: TargetToken = None,
    fisher: str = "low-rank",
    rank: int = 1,
    batch_size: int = 8,
    progress: bool | None = None,
) -> Attribution | list[Attribution]:
    """Score every token of `text` (or of each text in a list) for the prediction at `target_position`.

    `variant` is 'semantic', 'fisher', 'temperature' or 'gradient-x-input', or a `JacobianScope` spec.
    `target_token` (semantic, gradient-x-input) is the token whose logit is explained; default: the
    prediction. `fisher` is 'low-rank' (top `rank` eigenvectors of F) or 'exact'. A `JacobianScope`
    given as `variant` carries all of these itself. Returns one `Attribution` for a string, a list for a list.
    """
    scope = (
        variant
        if isinstance(variant, JacobianScope)
        else JacobianScope(
            variant=variant,
            target_position=target_position,
            target_token=target_token,
            fisher=fisher,
            rank=rank,
            model=model.name,
        )
    )
    texts = [text] if isinstance(text, str) else list(text)
    results = attribute(texts, model, [scope], batch_size=batch_size, progress=progress)[0]
    return results[0] if isinstance(text, str) else results


__all__ = [
    "jacobian_scope",
    "attribute",
    "attribution_config",
    "embedding_path",
    "prepare",
    "Rows",
    "Forward",
    "pullback",
    "scores_for",
    "resolve_target_token",
    "DIRECTION_CHUNK",
]
