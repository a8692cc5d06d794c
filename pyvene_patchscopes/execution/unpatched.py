"""The null reading: each target prompt that a vector is written into, run once with nothing written.

A vector's reading means something only beside what the target says unpatched: a random direction often reads the
same text as a real one, and a reading equal to the null reading says the vector changed nothing visible
(`PatchscopeResult.agrees_with_null`). One plain forward (and greedy generation, as the readout's) runs per distinct
(target model, target prompt, max_new_tokens), whatever the execution path of the rows.

The same pass measures the target's own residual norms at every l* written, and a vector whose written size
α·‖f(v)‖ is more than `NORM_FACTOR` times smaller or larger than the median there gets a `VectorNormWarning`
naming both: a unit-norm vector at SelfIE's l* = 0 of SmolLM2 is 43 times smaller than the states of its prompt
there, and its placeholders read as empty ('\n\n\n…').

A readout of NaN probabilities is judged against the same unpatched run (`check_readouts`): where the target prompt
unpatched reads finite ones, the write made it NaN (α·f(h), or the state it lands on, left the dtype's range, at the
slots or in the layers above), and `run` refuses it in one line naming α; where the model itself gives NaN, the
readout is returned as it is.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import SpecError, VectorNormWarning
from ..models import ModelHandle
from ..models.architectures import architecture
from ..models.devices import input_device
from ..models.parts import generator
from ..models.sites import Site, final_norm
from ..resolve import Models, Resolved
from ..result import PatchscopeResult, TokenProb, top_k
from ..spec.parts import VectorSource
from ..spec.positions import token_ids
from .plain import greedy_config
from .stack import evaluating

# A written vector more than this many times smaller or larger than the median norm of the target's own states at
# l* is flagged. An order of magnitude: inside it a scale search has room to work; outside it the write is next to
# nothing beside the states there (too small) or overwhelms the layers above (too large).
NORM_FACTOR = 10.0


@dataclass(frozen=True)
class NullReading:
    """What the target says with nothing written, and the size of its own states where vectors are written."""

    top: list[TokenProb]
    generation: str | None
    norms: dict[Site, float]  # median norm of the target's states at each site, token 0 (the sink) left out


def null_readings(
    items: Sequence[Resolved], written: Sequence[torch.Tensor], models: Models, top: int
) -> list[NullReading]:
    """The null reading of each vector row (`items`, with f(v) for each in `written`), computed once per distinct
    (target model, target prompt, max_new_tokens); warns about vectors far from the norms there."""
    keys = [(item.scope.target_model, item.scope.target.prompt, item.scope.max_new_tokens) for item in items]
    sites: dict[tuple[str, str, int], list[Site]] = {}
    for key, item in zip(keys, items):
        sites.setdefault(key, []).append(item.target_site)
    read = {
        key: read_unpatched(models[key[0]], key[1], key[2], top, list(dict.fromkeys(at))) for key, at in sites.items()
    }
    readings = [read[key] for key in keys]
    warn_far_norms(items, written, readings)
    return readings


def read_unpatched(
    handle: ModelHandle, prompt: str, max_new_tokens: int, top: int, sites: Sequence[Site] = ()
) -> NullReading:
    """`prompt` run unpatched on `handle`: its top-k next tokens, its greedy generation, and the median norm of its
    states at each of `sites` on the prompt pass."""
    ids = torch.tensor([token_ids(handle.tokenizer, prompt)], device=input_device(handle.model))
    norms: dict[Site, float] = {}
    hooks = [
        _site_module(handle.model, site).register_forward_hook(partial(_keep_norm, norms, site, ids.shape[1]))
        for site in sites
    ]
    try:
        with evaluating(handle.model), torch.no_grad():
            if max_new_tokens:
                out = generator(handle.model).generate(
                    ids, attention_mask=torch.ones_like(ids), generation_config=greedy_config(handle, max_new_tokens)
                )
                logits, new = out.logits[0][0], out.sequences[0, ids.shape[1] :].tolist()
            else:
                logits, new = handle.model(input_ids=ids).logits[0, -1], None
    finally:
        for hook in hooks:
            hook.remove()
    text = None if new is None else handle.tokenizer.decode(new, skip_special_tokens=True)
    return NullReading(top_k(logits.float(), handle.tokenizer, top), text, norms)


def _site_module(model: nn.Module, site: Site) -> nn.Module:
    if site.after_final_norm:
        return final_norm(model)
    return architecture(model).blocks(model)[site.layer]


def _keep_norm(norms: dict[Site, float], site: Site, length: int, module: nn.Module, args: Any, out: Any) -> None:
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if site not in norms and isinstance(hidden, torch.Tensor) and hidden.ndim == 3 and hidden.shape[1] == length:
        states = hidden[0, 1:] if length > 1 else hidden[0]  # the sink's outsized norm left out
        norms[site] = float(states.float().norm(dim=-1).median())


def check_readouts(items: Sequence[Resolved], results: Sequence[PatchscopeResult], models: Models) -> None:
    """Refuse, in one line, the first readout of NaN probabilities whose target prompt reads finite ones unpatched
    (its null reading, or one unpatched run per distinct target prompt, made only when some readout is NaN)."""
    unpatched: dict[tuple[str, str], list[TokenProb]] = {}
    for k, (item, result) in enumerate(zip(items, results)):
        if all(math.isfinite(t.prob) for t in result.top):
            continue
        name, prompt = item.scope.target_model, item.scope.target.prompt
        if result.null_top is not None:
            unpatched.setdefault((name, prompt), result.null_top)
        if (name, prompt) not in unpatched:
            unpatched[(name, prompt)] = read_unpatched(models[name], prompt, 0, 1).top
        if all(math.isfinite(t.prob) for t in unpatched[(name, prompt)]):
            target = item.scope.target
            dtype = models[name].dtype
            raise SpecError(
                f"Patchscope {k} reads NaN probabilities on {name}, whose target prompt unpatched reads finite ones: "
                f"its write at l*={item.target_layer} (write={target.write!r}, Target.alpha={target.alpha!r}) leaves "
                f"{str(dtype).removeprefix('torch.')}'s range (|x| <= {torch.finfo(dtype).max:.4g}) at the slots or "
                "in the layers above (allowed: a write within that range: a smaller |Target.alpha|, or a source of "
                "smaller norm)"
            )


def warn_far_norms(items: Sequence[Resolved], written: Sequence[torch.Tensor], readings: Sequence[NullReading]) -> None:
    """One `VectorNormWarning` when any row writes α·‖f(v)‖ (at any of its slots) more than `NORM_FACTOR` times
    below or above the median norm of its target's own states at l*. ``norm-matched-add`` rows are matched to it,
    and a zero write (an ablation, or α = 0) is meant."""
    far = []
    for item, vector, reading in zip(items, written, readings):
        typical = reading.norms.get(item.target_site)
        source = item.scope.source
        if item.scope.target.write == "norm-matched-add" or not typical or not isinstance(source, VectorSource):
            continue
        sizes = [s for s in (abs(item.scope.target.alpha) * vector.float().norm(dim=-1).reshape(-1)).tolist() if s]
        size = max(sizes, key=lambda s: abs(math.log(s / typical)), default=None)  # a zero write is an ablation
        if size is not None and not 1 / NORM_FACTOR <= size / typical <= NORM_FACTOR:
            far.append((item, source.name, size, typical))
    if not far:
        return
    item, name, size, typical = far[0]
    ratio = f"{typical / size:.3g}x smaller" if size < typical else f"{size / typical:.3g}x larger"
    warnings.warn(
        f"{len(far)} of {len(items)} vector reading(s) write a vector far from the size of the target's own states: "
        f"{name!r} writes alpha * |f(v)| = {size:.3g} at l*={item.target_layer} of "
        f"{item.scope.target_model}, where the target prompt's states have median norm {typical:.3g} ({ratio}; "
        f"flagged beyond {NORM_FACTOR:g}x either way). Too small, a replaced slot reads as empty and an added vector "
        "changes little (compare result.null_top, the target unpatched); too large, it overwhelms the layers above. "
        "Scale it with Target.alpha, or pick alpha with pyvene_patchscopes.analysis.scales.scale_search.",
        VectorNormWarning,
        stacklevel=4,
    )


__all__ = ["NullReading", "null_readings", "read_unpatched", "check_readouts", "warn_far_norms", "NORM_FACTOR"]
