"""The output head seen from y: logits z(y), their Jacobian W, and the Fisher information F pulled back to y.

F = Wᵀ(diag(p) − ppᵀ)W is d x d. A Fisher score tr(J_tᵀ F J_t) = Σ_i ‖g_iᵀ J_t‖² for any factor
F = Σ_i g_i g_iᵀ, so the scores need one vector-Jacobian product per factor row g_i:

- ``exact``: g_i are the rows of R in a QR factorisation of A = diag(√p)(W − 1 w̄ᵀ), w̄ = pᵀW, since
  AᵀA = F. R is found by a tall-skinny QR over vocabulary chunks, so A is never held whole;
- ``low-rank``: g_i = √λ_i u_i for the top-k eigenpairs of F (the paper's default, k = 1).

With k = d the two agree to rounding (a test checks it), although they share no factorisation.
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB_CHUNK = 16384


def softcap(model: nn.Module) -> float | None:
    """The final-logit soft cap c (z = c·tanh(Wy / c)), as Gemma 2 has; None for most models."""
    from ..discovery import softcap as config_softcap

    return config_softcap(model.config.get_text_config())


def scale(model: nn.Module) -> float:
    """s in z = s · W y (Cohere's logit_scale, Granite's 1 / logits_scaling), as `architectures` found it."""
    from ..architectures import architecture
    from ..errors import PatchscopeError

    found = architecture(model).logit_scale
    if found is None:
        raise PatchscopeError(f"{type(model).__name__}'s logits are not a scaled copy of its unembedding of y (a "
                              "prediction head of its own layers runs between them), so Jacobian Scopes cannot "
                              "pull the output distribution back to y")
    return found


def logits(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """z(y): the model's own unembedding of final hidden states [B, d] (its scale and soft cap included)."""
    z = model.get_output_embeddings()(y).float() * scale(model)
    cap = softcap(model)
    return z if cap is None else cap * torch.tanh(z / cap)


def head_weight(model: nn.Module, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """∂z/∂y for each row: W [V, d], or diag(1 − tanh²) W [B, V, d] under a soft cap."""
    weight = model.get_output_embeddings().weight.to(dtype) * scale(model)
    cap = softcap(model)
    if cap is None:
        return weight
    slope = 1 - (z.to(dtype) / cap) ** 2  # z is already capped: tanh(z_raw / c) = z / c
    return slope.unsqueeze(-1) * weight


def _rows(weight: torch.Tensor, row: int) -> torch.Tensor:
    return weight if weight.dim() == 2 else weight[row]


def fisher_matrix(weight: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """F = Wᵀ diag(p) W − w̄w̄ᵀ (w̄ = Wᵀp) for one row: weight [V, d], p [V] -> [d, d].

    Summed as Σ_v p_v (w_v − w̄)(w_v − w̄)ᵀ: the same matrix without the cancellation of the two terms,
    which costs float32 about three digits when p is peaked.
    """
    p = p.to(weight.dtype)
    mean = weight.T @ p
    fisher = torch.zeros(weight.shape[1], weight.shape[1], dtype=weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        centred = weight[start:start + VOCAB_CHUNK] - mean
        fisher += centred.T @ (p[start:start + VOCAB_CHUNK, None] * centred)
    return fisher


def low_rank_factor(fisher: torch.Tensor, rank: int) -> torch.Tensor:
    """√λ_i u_i for the `rank` largest eigenpairs of F: [rank, d]."""
    values, vectors = torch.linalg.eigh(fisher.double())
    top = torch.argsort(values, descending=True)[:rank]
    return (values[top].clamp(min=0).sqrt().unsqueeze(-1) * vectors[:, top].T).to(fisher.dtype)


def exact_factor(weight: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """R with RᵀR = F, from A = diag(√p)(W − 1 w̄ᵀ) by a chunked (tall-skinny) QR: [min(V, d), d]."""
    p = p.to(weight.dtype)
    mean = weight.T @ p
    partial = []
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        chunk = p[start:start + VOCAB_CHUNK, None].sqrt() * (weight[start:start + VOCAB_CHUNK] - mean)
        partial.append(torch.linalg.qr(chunk, mode="r").R)
    stacked = torch.cat(partial)
    return stacked if len(partial) == 1 else torch.linalg.qr(stacked, mode="r").R


def fisher_factors(weight: torch.Tensor, p: torch.Tensor, form: str, rank: int) -> torch.Tensor:
    """Factor rows for every batch row: [k, B, d] (k = rank for low-rank, min(V, d) for exact)."""
    rows = []
    for row in range(p.shape[0]):
        w = _rows(weight, row)
        if form == "exact":
            rows.append(exact_factor(w, p[row]))
        else:
            rows.append(low_rank_factor(fisher_matrix(w, p[row]), rank))
    return torch.stack(rows, 1)


__all__ = ["softcap", "scale", "logits", "head_weight", "fisher_matrix", "low_rank_factor", "exact_factor", "fisher_factors"]
