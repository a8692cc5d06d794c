"""Fit the Jacobian lens: J_l = E[∂h_final/∂h_l], the reference estimator exactly, with a resumable running sum.

The estimator (anthropics/jacobian-lens ``jlens/fitting.py``, TransformerLens ``tools/analysis/jacobian_lens.py``):

- h_l is block l's output, h_final the last block's output (the final norm's input); parameters are frozen and the
  graph starts at the first source layer;
- per prompt, the valid positions V are ``skip_first .. len - 2`` (the first 16 and the last are left out);
- one forward pass of the prompt replicated ``dim_batch`` times, then one backward pass per ``dim_batch`` output
  directions: row b's cotangent is 1 at (t', dim_start + b) for every t' in V, so by causal attention the
  gradient at a source position t is Σ_{t' ≥ t, t' ∈ V} ∂h_final[t', i]/∂h_l[t];
- the rows are averaged over the source positions t in V (float32), giving the prompt's J_l ([d_out, d_in], used
  as J @ h); prompts count equally: J_l = Σ_prompts J_l(prompt) / n.

A checkpoint in the reference's running-sum form (``jacobian_sum``, ``n_done``, ``next_idx`` with the settings) is
written atomically every ``checkpoint_every`` prompts; a fit that is killed resumes from it and loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SpecError, check_int
from ..execution.stack import evaluating
from ..models import ModelHandle
from ..models.architectures import architecture
from ..models.order import data_first
from ..models.probes import hooks_restored
from ..persist.jlens import JacobianLens, load_pt, read_count, read_matrices, refuse_file

SKIP_FIRST = 16
CHECKPOINT_KEYS = (
    "jacobian_sum",
    "n_done",
    "next_idx",
    "source_layers",
    "target_layer",
    "skip_first",
    "prompts_sha256",
)


class ShortPromptWarning(UserWarning):
    """A prompt too short to have a valid position (more than skip_first + 1 tokens) was left out of the fit."""


class _Reached(Exception):
    """Raised after the last block: the final norm and the unembedding are not needed."""


@data_first("model", "texts")
def fit_jacobian_lens(
    texts: Sequence[str],
    model: ModelHandle,
    layers: Sequence[int] | None = None,
    dim_batch: int = 8,
    max_seq_len: int = 128,
    skip_first: int = SKIP_FIRST,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = True,
    progress: bool | None = None,
) -> JacobianLens:
    """Fit J_l for every source layer in `layers` (default: all but the last) on `texts` (see the module docstring).

    With ``checkpoint``, the running sum is saved there every ``checkpoint_every`` prompts and a rerun resumes from
    it (``resume=False`` starts over); the settings and the prompts must be the same. The user's model is left as
    it was: its parameters' ``requires_grad``, its modes and its hooks are restored after.
    """
    n_layers, d = model.n_layers, model.hidden_size
    sources = sorted(set(range(n_layers - 1) if layers is None else [_source_layer(l, n_layers) for l in layers]))
    if not sources:
        raise SpecError(f"layers={layers!r} is empty (allowed: source layers in 0..{n_layers - 2})")
    dim_batch = check_int("dim_batch", dim_batch, 1, d)
    max_seq_len = check_int("max_seq_len", max_seq_len, 2)
    skip_first = check_int("skip_first", skip_first, 0)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise SpecError("texts must be a non-empty list of non-empty strings")
    settings = {
        "source_layers": sources,
        "target_layer": n_layers - 1,
        "skip_first": skip_first,
        "prompts_sha256": _prompts_hash(texts, max_seq_len),
    }
    state: dict[str, Any] = {"jacobian_sum": {l: torch.zeros(d, d) for l in sources}, "n_done": 0, "next_idx": 0}
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state = read_checkpoint(checkpoint, d, settings)
    show = progress if progress is not None else len(texts) > 1
    with _frozen(model.model), evaluating(model.model), hooks_restored(model.model):
        for index in tqdm(range(len(texts)), desc="fitting J-lens", unit="prompt", disable=not show):
            if index < state["next_idx"]:
                continue
            ids = model.tokenizer(texts[index], return_tensors="pt", truncation=True, max_length=max_seq_len)[
                "input_ids"
            ]
            if ids.shape[1] <= skip_first + 1:
                warnings.warn(
                    f"texts[{index}] has {ids.shape[1]} tokens, too few for a valid position after "
                    f"skip_first={skip_first} (allowed: at least {skip_first + 2}); it is left out",
                    ShortPromptWarning,
                    stacklevel=2,
                )
            else:
                for layer, matrix in prompt_jacobians(model, ids[0], sources, dim_batch, skip_first).items():
                    state["jacobian_sum"][layer] += matrix
                state["n_done"] += 1
            state["next_idx"] = index + 1
            if checkpoint is not None and (state["next_idx"] % checkpoint_every == 0 or index == len(texts) - 1):
                write_checkpoint(checkpoint, state, settings)
    if not state["n_done"]:
        raise SpecError(
            f"no text has more than skip_first + 1 = {skip_first + 1} tokens (allowed: longer texts, "
            "or a smaller skip_first)"
        )
    metadata = {
        "estimator": "reference (anthropics/jacobian-lens)",
        "target_layer": n_layers - 1,
        "skip_first": skip_first,
        "dim_batch": dim_batch,
        "max_seq_len": max_seq_len,
        "model": model.name,
        "hook_convention": "block output (resid_post)",
        "prompts_sha256": settings["prompts_sha256"],
    }
    return JacobianLens(
        {l: s / state["n_done"] for l, s in state["jacobian_sum"].items()}, state["n_done"], d, metadata
    )


def prompt_jacobians(
    model: ModelHandle, ids: torch.Tensor, sources: list[int], dim_batch: int, skip_first: int
) -> dict[int, torch.Tensor]:
    """One prompt's J_l for every source layer: [d_out, d_in], float32 on the CPU (the module docstring's steps)."""
    hf = model.model
    arch = architecture(hf)
    blocks = arch.blocks(hf)
    n_layers, d, length = len(blocks), model.hidden_size, int(ids.shape[0])
    valid = torch.arange(skip_first, length - 1)
    seen: dict[int, torch.Tensor] = {}

    def record(layer: int):
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            hidden = out[0] if isinstance(out, tuple) else out
            if layer == sources[0]:  # the graph starts here
                hidden = hidden.detach().requires_grad_(True)
                out = (hidden, *out[1:]) if isinstance(out, tuple) else hidden
            seen[layer] = hidden
            if layer == n_layers - 1:
                raise _Reached
            return out

        return hook

    handles = [blocks[l].register_forward_hook(record(l)) for l in sorted(set(sources) | {n_layers - 1})]
    try:
        with torch.enable_grad():
            try:
                hf(input_ids=ids[None].expand(dim_batch, -1).to(model.device), use_cache=False)
            except _Reached:
                pass
            target = seen[n_layers - 1]
            inputs = [seen[l] for l in sources]
            jacobians = {l: torch.empty(d, d) for l in sources}
            cotangent = torch.zeros_like(target)
            rows = torch.arange(dim_batch, device=target.device)
            positions = valid.to(target.device)
            starts = list(range(0, d, dim_batch))
            for k, start in enumerate(starts):
                n = min(dim_batch, d - start)
                cotangent.zero_()
                cotangent[rows[:n, None], positions[None, :], start + rows[:n, None]] = 1.0
                grads = torch.autograd.grad(target, inputs, cotangent, retain_graph=k < len(starts) - 1)
                for layer, grad in zip(sources, grads):
                    jacobians[layer][start : start + n] = grad[:n, positions].float().mean(1).cpu()
    finally:
        for handle in handles:
            handle.remove()
    return jacobians


# ---- the running-sum checkpoint, in the reference's form ---------------------------------------------------------
def write_checkpoint(path: str | os.PathLike, state: dict[str, Any], settings: dict[str, Any]) -> Path:
    """``{jacobian_sum: {layer: fp32 [d, d]}, n_done, next_idx, source_layers, target_layer, skip_first}`` (and
    the prompts' hash), written whole or not at all."""
    from ..core.outputs import replacing

    payload = {
        "jacobian_sum": {l: m.float().contiguous() for l, m in state["jacobian_sum"].items()},
        "n_done": int(state["n_done"]),
        "next_idx": int(state["next_idx"]),
        **settings,
    }
    with replacing(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def read_checkpoint(path: str | os.PathLike, d_model: int, settings: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint read as tensors and numbers only and checked against this fit's settings."""
    where = Path(path)
    payload = load_pt(path, "Jacobian lens checkpoint")
    if (
        not isinstance(payload, dict)
        or not {"jacobian_sum", "n_done", "next_idx"} <= set(payload)
        or set(payload) - set(CHECKPOINT_KEYS)
    ):
        keys = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise refuse_file(where, f"is not a fit checkpoint: it holds {keys} (allowed: {list(CHECKPOINT_KEYS)})")
    for key, value in settings.items():
        if key in payload and payload[key] != value:
            raise refuse_file(
                where,
                f"was written with {key}={payload[key]!r}, not {value!r}: another fit (pass "
                "resume=False to start over, or the same settings and texts)",
            )
    sums = read_matrices(where, payload["jacobian_sum"], d_model, "jacobian_sum")
    if list(sums) != settings["source_layers"]:
        raise refuse_file(where, f"jacobian_sum has layers {list(sums)}, this fit {settings['source_layers']}")
    return {
        "jacobian_sum": sums,
        "n_done": read_count(where, payload, "n_done", 0, 1 << 40),
        "next_idx": read_count(where, payload, "next_idx", 0, 1 << 40),
    }


def _source_layer(layer: Any, n_layers: int) -> int:
    """A source layer below the last (the last block's output is the target: its J is I)."""
    return check_int("layers[]", layer, 0, n_layers - 2)


def _prompts_hash(texts: list[str], max_seq_len: int) -> str:
    return hashlib.sha256(json.dumps([max_seq_len, texts]).encode()).hexdigest()


class _frozen:
    """Parameters' ``requires_grad`` off for the duration, each parameter's own flag restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    def __enter__(self) -> None:
        for parameter, _ in self.flags:
            parameter.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)


__all__ = [
    "fit_jacobian_lens",
    "prompt_jacobians",
    "write_checkpoint",
    "read_checkpoint",
    "ShortPromptWarning",
    "SKIP_FIRST",
]
