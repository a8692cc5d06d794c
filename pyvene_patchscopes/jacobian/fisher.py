"""The output head seen from y: logits z(y), their Jacobian W, and the Fisher information F pulled back to y.

F = Wᵀ(diag(p) − ppᵀ)W is d x d. A Fisher score tr(J_tᵀ F J_t) = Σ_i ‖g_iᵀ J_t‖² for any factor
F = Σ_i g_i g_iᵀ, so the scores need one vector-Jacobian product per factor row g_i:

- ``exact``: g_i are the rows of R in a QR factorisation of A = diag(√p)(W − 1 w̄ᵀ), w̄ = pᵀW, since
  AᵀA = F. R is found by a tall-skinny QR over vocabulary chunks, so A is never held whole;
- ``low-rank``: g_i = √λ_i u_i for the top-k eigenpairs of F (the paper's default, k = 1).

With k = d the two agree to rounding (a test checks it), although they share no factorisation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..models.parts import text_config, unembedding, weight_of

VOCAB_CHUNK = 16384


def softcap(model: nn.Module) -> float | None:
    """The final-logit soft cap c (z = c·tanh(Wy / c)), as Gemma 2 has; None for most models."""
    from ..models.discovery import softcap as config_softcap

    return config_softcap(text_config(model))


def scale(model: nn.Module) -> float:
    """s in z = s · W y (Cohere's logit_scale, Granite's 1 / logits_scaling), as `architectures` found it."""
    from ..errors import PatchscopeError
    from ..models.architectures import architecture

    found = architecture(model).logit_scale
    if found is None:
        raise PatchscopeError(
            f"{type(model).__name__}'s logits are not a scaled copy of its unembedding of y (a "
            "prediction head of its own layers runs between them), so Jacobian Scopes cannot "
            "pull the output distribution back to y"
        )
    return found


def logits(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """z(y): the model's own unembedding of final hidden states [B, d] (its scale and soft cap included)."""
    z = unembedding(model)(y).float() * scale(model)
    cap = softcap(model)
    return z if cap is None else cap * torch.tanh(z / cap)


@contextmanager
def head_weight(model: nn.Module) -> Iterator[torch.Tensor]:
    """The unembedding W [V, d] as the model stores it (its own dtype, never copied whole).

    It is read through the head module: where accelerate offloads the head (to the CPU or to disk), its hook
    loads the weight onto the execution device for the duration, as it does for a forward call.
    """
    from accelerate.utils import align_module_device

    head = unembedding(model)
    with align_module_device(head):
        yield weight_of(head)


def slopes(model: nn.Module, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """∂z/∂(Wy) per row and token under a soft cap, 1 − tanh²: [B, V]; None without one."""
    cap = softcap(model)
    return None if cap is None else 1 - (z.to(dtype) / cap) ** 2  # z is already capped: tanh(z_raw / c) = z / c


def head_rows(
    weight: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype, factor: float = 1.0, slope: torch.Tensor | None = None
) -> torch.Tensor:
    """∂z_b[ids_b]/∂y_b for each row b: factor · slope[b, id] · W[id], [B, d]."""
    rows = weight[ids.to(weight.device)].to(dtype) * factor
    if slope is None:
        return rows
    return slope[torch.arange(len(ids), device=slope.device), ids.to(slope.device)].unsqueeze(-1).to(rows.device) * rows


def _chunks(
    weight: torch.Tensor, dtype: torch.dtype, factor: float, slope: torch.Tensor | None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """∂z/∂y of one row in vocabulary chunks, converted chunk by chunk: (slice, [chunk, d])."""
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        part = slice(start, start + VOCAB_CHUNK)
        chunk = weight[part].to(dtype) * factor
        yield part, chunk if slope is None else slope[part, None].to(chunk.device, dtype) * chunk


def _mean(
    weight: torch.Tensor, p: torch.Tensor, dtype: torch.dtype, factor: float, slope: torch.Tensor | None
) -> torch.Tensor:
    mean = torch.zeros(weight.shape[1], dtype=dtype, device=weight.device)
    for part, chunk in _chunks(weight, dtype, factor, slope):
        mean += chunk.T @ p[part]
    return mean


def fisher_matrix(
    weight: torch.Tensor,
    p: torch.Tensor,
    dtype: torch.dtype | None = None,
    factor: float = 1.0,
    slope: torch.Tensor | None = None,
) -> torch.Tensor:
    """F = Wᵀ diag(p) W − w̄w̄ᵀ (w̄ = Wᵀp) for one row: weight [V, d], p [V] -> [d, d].

    W here is ∂z/∂y = factor · diag(slope) · weight, streamed over the vocabulary in `dtype` (default:
    the weight's). Summed as Σ_v p_v (w_v − w̄)(w_v − w̄)ᵀ: the same matrix without the cancellation of
    the two terms, which costs float32 about three digits when p is peaked.
    """
    dtype = dtype or weight.dtype
    p = p.to(weight.device, dtype)
    mean = _mean(weight, p, dtype, factor, slope)
    fisher = torch.zeros(weight.shape[1], weight.shape[1], dtype=dtype, device=weight.device)
    for part, chunk in _chunks(weight, dtype, factor, slope):
        centred = chunk - mean
        fisher += centred.T @ (p[part, None] * centred)
    return fisher


def low_rank_factor(fisher: torch.Tensor, rank: int) -> torch.Tensor:
    """√λ_i u_i for the `rank` largest eigenpairs of F: [rank, d]."""
    values, vectors = torch.linalg.eigh(fisher.double())
    top = torch.argsort(values, descending=True)[:rank]
    return (values[top].clamp(min=0).sqrt().unsqueeze(-1) * vectors[:, top].T).to(fisher.dtype)


def exact_factor(
    weight: torch.Tensor,
    p: torch.Tensor,
    dtype: torch.dtype | None = None,
    factor: float = 1.0,
    slope: torch.Tensor | None = None,
) -> torch.Tensor:
    """R with RᵀR = F, from A = diag(√p)(W − 1 w̄ᵀ) by a chunked (tall-skinny) QR: [min(V, d), d]."""
    dtype = dtype or weight.dtype
    p = p.to(weight.device, dtype)
    mean = _mean(weight, p, dtype, factor, slope)
    partial = []
    for part, chunk in _chunks(weight, dtype, factor, slope):
        partial.append(torch.linalg.qr(p[part, None].sqrt() * (chunk - mean), mode="r").R)
    stacked = torch.cat(partial)
    return stacked if len(partial) == 1 else torch.linalg.qr(stacked, mode="r").R


def fisher_factors(
    weight: torch.Tensor,
    p: torch.Tensor,
    form: str,
    rank: int,
    dtype: torch.dtype,
    factor: float = 1.0,
    slope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Factor rows for every batch row: [k, B, d] (k = rank for low-rank, min(V, d) for exact)."""
    rows = []
    for row in range(p.shape[0]):
        own = None if slope is None else slope[row]
        if form == "exact":
            rows.append(exact_factor(weight, p[row], dtype, factor, own))
        else:
            rows.append(low_rank_factor(fisher_matrix(weight, p[row], dtype, factor, own), rank))
    return torch.stack(rows, 1)


__all__ = [
    "softcap",
    "scale",
    "logits",
    "head_weight",
    "head_rows",
    "slopes",
    "fisher_matrix",
    "low_rank_factor",
    "exact_factor",
    "fisher_factors",
]
