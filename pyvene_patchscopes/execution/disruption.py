"""How much the model notices a state written in place of h: the disruption D of `verify`, on two paths.

D of a vector v written in place of the state at (S, i, l) is the mean, over the positions of S the settings name
(from i on, or the last), of KL(original || patched) of the next-token distributions. Every row patches the same S
at the same (i, l), so on the planned execution (`stack.Stack`, `layered.Layered`) S runs once: the rows share its
keys and values before i and its states below l, and each row computes only the suffix from l up. On the plain
pyvene path (families the planned execution cannot serve, or ``planned=False``) each row is one pyvene interchange
intervention on the whole of S. Both give the same D to float32 rounding (tests/test_verify.py holds both to
hand-written hooks).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..compat import base_locations, intervenable, pyvene_guard
from ..models import ModelHandle
from ..models.parts import weight_of
from ..models.sites import Site
from ..plan.batching import Batch
from ..plan.pyvene_config import patch_config
from ..spec.mappings import build_mapping
from ..spec.positions import token_ids
from .check import stack_for
from .planned import use_planned
from .stack import evaluating

MAX_LOGITS = 1 << 26
"""A batch of planned rows keeps at most this many logits (rows x positions x vocabulary; 256 MiB in float32)."""


def disruptions(
    handle: ModelHandle,
    prompt: str,
    position: int,
    sites: Sequence[Site],
    vectors: torch.Tensor,
    positions: str = "from_source",
    batch_size: int = 64,
    planned: bool = True,
) -> torch.Tensor:
    """D for each row r of `vectors` ([rows, d]) written in place of the state at (prompt, position, sites[r]): the
    mean over the named positions of KL(original || patched) of the next-token distributions, in float32: [rows].
    Runs the planned execution where the model takes it (`use_planned`): one pass of the prompt for every row, the
    rows packed across layers; else the plain pyvene path, one intervention per site."""
    if use_planned(handle.model, planned):
        return _planned(handle, prompt, position, sites, vectors, positions, batch_size)
    found = torch.empty(len(sites))
    for site in dict.fromkeys(sites):
        index = torch.tensor([r for r, s in enumerate(sites) if s == site])
        found[index] = _plain(handle, prompt, position, site, vectors[index], positions, batch_size)
    return found


def kl_from(original: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(original || patched), from logits: original [P, vocab], patched [rows, P, vocab]."""
    want = torch.log_softmax(original.float(), -1)
    got = torch.log_softmax(patched.float(), -1)
    return (want.exp() * (want - got)).sum(-1).mean(-1)


def _kept(logits: torch.Tensor, positions: str) -> torch.Tensor:
    """The positions D is taken over, of logits that begin at i: all of them, or the last."""
    return logits if positions == "from_source" else logits[..., -1:, :]


def _planned(
    handle: ModelHandle,
    prompt: str,
    position: int,
    sites: Sequence[Site],
    vectors: torch.Tensor,
    positions: str,
    batch_size: int,
) -> torch.Tensor:
    stack = stack_for(handle.model)
    assert stack is not None  # use_planned said so
    ids = torch.tensor(token_ids(handle.tokenizer, prompt))
    layers = torch.tensor([site.layer for site in sites])
    after_norm = torch.tensor([site.after_final_norm for site in sites])
    _, key = stack.row_keys(layers, after_norm)
    order = torch.argsort(key, stable=True)  # a batch's rows begin at nearby layers
    kept = 1 if positions == "last" else len(ids) - position
    rows = max(1, min(batch_size, MAX_LOGITS // (kept * weight_of(stack.lm_head).shape[0])))
    found = torch.empty(len(sites))
    with evaluating(stack.model), torch.no_grad():
        shared = stack.share(ids, position)
        original = _kept(stack.suffix_logits(shared), positions)
        for start in range(0, len(order), rows):
            index = order[start : start + rows]
            decoded = stack.patched(
                shared, vectors[index], layers[index], after_norm=after_norm[index], keep_suffix=True
            )
            assert decoded.suffix is not None  # keep_suffix
            found[index] = kl_from(original, _kept(decoded.suffix, positions)).cpu()
    return found


def _plain(
    handle: ModelHandle,
    prompt: str,
    position: int,
    site: Site,
    vectors: torch.Tensor,
    positions: str,
    batch_size: int,
) -> torch.Tensor:
    batch = Batch.encode(handle, [prompt])
    found = []
    with pyvene_guard(handle.model), torch.no_grad():
        original = _kept(handle.model(**batch.inputs).logits[0, position:], positions)
        identity = build_mapping("identity", handle.hidden_size, handle.hidden_size).to(handle.device)
        pvm = intervenable(patch_config(site, handle.hidden_size, identity), handle.model)
        key = pvm.sorted_keys[0]
        for start in range(0, len(vectors), batch_size):
            chunk = vectors[start : start + batch_size].to(handle.device)
            inputs = {name: value.repeat(len(chunk), 1) for name, value in batch.inputs.items()}
            _, output = pvm(
                base=inputs,
                unit_locations=base_locations([position] * len(chunk)),
                source_representations={key: chunk[:, None].contiguous()},
            )
            found.append(kl_from(original, _kept(output.logits[:, position:], positions)).cpu())
    return torch.cat(found)


__all__ = ["disruptions", "kl_from", "MAX_LOGITS"]
