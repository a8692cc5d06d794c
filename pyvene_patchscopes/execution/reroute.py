"""The CoT Patchscope (paper §5): read (l, i) and write (l*, i*) within one pass of one sequence.

The sequence is S = T, e.g. ``[π2][π1]`` = "The current CEO of" + "the company that created Visual Basic
Script": the last token of π1 holds hop 1's answer, which is written over the last token of π2. With
``Reroute.split`` the two segments cannot attend to each other (a 4D attention mask); tokens the
tokenizer puts before the text (BOS, SmolLM2's document start) stay visible to both, because they are the
attention sink, and generated tokens see everything.

When l <= l* this is one pyvene pass with one `RerouteIntervention` linked to both sites. When l > l*
the read comes later in the pass than the write, so it runs as two passes over the same masked
sequence: collect (l, i), then patch (l*, i*) — what the paper's code does with S = T.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..compat import intervenable, per_intervention_locations, pyvene_guard
from ..errors import PatchscopeError, SpecError
from ..models import ModelHandle
from ..plan.pyvene_config import collect_config, patch_config, reroute_config
from ..resolve import Resolved
from ..result import PatchscopeResult, top_k
from ..spec.mappings import build_mapping
from ..spec.parts import Reroute
from .stack import evaluating


@dataclass
class MaskedBatch:
    """Left-padded prompts with per-row additive 4D masks (causal, segments isolated where asked)."""

    input_ids: torch.Tensor  # [B, n]
    attention_mask: torch.Tensor  # [B, 1, n, n] additive
    position_ids: torch.Tensor  # [B, n]
    pad: list[int]  # left padding per row

    def inputs(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
            "use_cache": True,
        }


def segments(handle: ModelHandle, prompt: str, split: int | None) -> list[int]:
    """Per token: 0 = added before the text (shared), 1 = first segment, 2 = from character `split` on."""
    encoded = handle.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    special = set(handle.tokenizer.all_special_ids)
    labels, seen_text = [], False
    for token, (start, end) in zip(ids, offsets):
        if not seen_text and token in special and end == 0:
            labels.append(0)
            continue
        seen_text = True
        labels.append(2 if split is not None and end > split else 1)
    return labels


def segment_mask(labels: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, n, n] mask: causal, and segments 1 and 2 never attend to each other."""
    seg = torch.tensor(labels)
    n = len(labels)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    crossing = ((seg[:, None] == 1) & (seg[None, :] == 2)) | ((seg[:, None] == 2) & (seg[None, :] == 1))
    allowed = causal & ~crossing
    mask = torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def encode(handle: ModelHandle, prompts: list[str], splits: list[int | None]) -> MaskedBatch:
    """Tokenise and left-pad; a padding position sees only itself, so no softmax row is empty."""
    tokenizer, dtype = handle.tokenizer, handle.dtype
    labels = [segments(handle, p, s) for p, s in zip(prompts, splits)]
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    n = max(map(len, ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mask = torch.full((len(ids), 1, n, n), torch.finfo(dtype).min, dtype=dtype)
    input_ids = torch.full((len(ids), n), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(ids), n), dtype=torch.long)
    pads = []
    for row, (tokens, seg) in enumerate(zip(ids, labels)):
        pad = n - len(tokens)
        pads.append(pad)
        input_ids[row, pad:] = torch.tensor(tokens)
        position_ids[row, pad:] = torch.arange(len(tokens))
        mask[row, 0, pad:, pad:] = segment_mask(seg, dtype)[0, 0]
        mask[row, 0, range(pad), range(pad)] = 0
    device = handle.device
    return MaskedBatch(input_ids.to(device), mask.to(device), position_ids.to(device), pads)


def _check_group(items: list[Resolved]) -> None:
    first = items[0]
    for item in items[1:]:
        if (item.source_site, item.target_site, item.scope.mapping) != (
            first.source_site,
            first.target_site,
            first.scope.mapping,
        ):
            raise SpecError("a reroute batch needs one (source site, target site, mapping); group the scopes first")


def _reroute(item: Resolved) -> Reroute:
    if item.scope.reroute is None:
        raise SpecError(
            "a reroute batch holds a scope without Patchscope.reroute (allowed: reroute scopes only); "
            "run() sends the others to the two-pass path"
        )
    return item.scope.reroute


def prompt_pass(item: "Resolved | list[Resolved]", handle: ModelHandle) -> tuple[Any, MaskedBatch]:
    """The patched prompt pass of CoT Patchscopes sharing (l, l*, f): model output (logits at every
    position, KV cache) and the padded batch it ran on."""
    items = item if isinstance(item, list) else [item]
    _check_group(items)
    batch = encode(handle, [i.scope.prompt_source.prompt for i in items], [_reroute(i).split for i in items])
    mapping = build_mapping(items[0].scope.mapping_spec, handle.hidden_size, handle.hidden_size).to(handle.device)
    with pyvene_guard(handle.model), torch.no_grad():
        return _prompt_pass(items, handle, batch, mapping), batch


_REASONS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def reroute_reason(model: nn.Module) -> str:
    """Why rerouting cannot run on `model`, in one line ("" when it can); worked out once per model.

    Rerouting pads its prompts, isolates the two hops with a 4D additive attention mask and decodes from the
    key/value cache, so the model's forward must take such a mask (and read it as a causal one) and return a
    cache. ALiBi families build their biases from a 2D mask, and recurrent layers have no mask to read.
    """
    if model not in _REASONS:
        _REASONS[model] = _probe(model)
    return _REASONS[model]


def _probe(model: nn.Module) -> str:
    from ..models.discovery import non_attention_kinds
    from ..models.probes import probe_ids

    kinds = non_attention_kinds(model)
    if kinds:
        return (
            f"its layers of kind {', '.join(kinds)} keep a state that no attention mask can isolate or skip, "
            "and rerouting pads its prompts and isolates the two hops with one"
        )
    ids = probe_ids(model, 5)
    device = ids.device
    dtype = next(model.parameters()).dtype
    mask = segment_mask([0] * ids.shape[1], dtype).to(device)
    try:
        with evaluating(model), torch.no_grad():
            plain = model(input_ids=ids, use_cache=False).logits.float()
            masked = model(
                input_ids=ids,
                attention_mask=mask,
                use_cache=True,
                position_ids=torch.arange(ids.shape[1], device=device)[None],
            )
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
        first = str(err).splitlines()[0][:120] if str(err) else ""
        return (
            f"its forward does not take a 4D attention mask ({type(err).__name__}: {first}), which rerouting "
            "needs to pad its prompts and isolate the two hops"
        )
    if not torch.allclose(masked.logits.float(), plain, atol=1e-4, rtol=1e-3):
        return (
            "its forward reads a causal 4D attention mask differently from no mask, so rerouting's mask would not hold"
        )
    if getattr(masked, "cache", None) is None and getattr(masked, "past_key_values", None) is None:
        return "its forward returns no key/value cache, which rerouting decodes from"
    return ""


def run_reroute(item: Resolved, handle: ModelHandle, top: int = 10) -> PatchscopeResult:
    """Run one CoT Patchscope (see `run_reroutes`)."""
    return run_reroutes([item], handle, top)[0]


def run_reroutes(
    items: list[Resolved], handle: ModelHandle, top: int = 10, batch_size: int = 32
) -> list[PatchscopeResult]:
    """Run CoT Patchscopes: batches that share (l, l*, f, max_new_tokens) get one prompt pass with the
    reroute, then batched greedy decoding from its KV cache.

    With isolated segments the write at i* cannot reach the prompt's last position, so the next-token
    ``top`` is the unpatched one; the generation (whose tokens see i*) is the readout.
    """
    why = reroute_reason(handle.model)
    if why:
        raise PatchscopeError(f"multi-hop rerouting cannot run on {type(handle.model).__name__}: {why}")
    groups: dict[tuple, list[int]] = {}
    for k, item in enumerate(items):
        key = (item.source_site, item.target_site, item.scope.mapping, item.scope.max_new_tokens)
        groups.setdefault(key, []).append(k)
    results: dict[int, PatchscopeResult] = {}  # row -> its readout, every row filled below
    for rows in groups.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            group = [items[k] for k in chunk]
            output, batch = prompt_pass(group, handle)
            max_new_tokens = group[0].scope.max_new_tokens
            with pyvene_guard(handle.model), torch.no_grad():
                logits = output.logits[:, -1].float()
                texts = _greedy(handle, output, batch, max_new_tokens) if max_new_tokens else [None] * len(group)
            for row, (k, item) in enumerate(zip(chunk, group)):
                results[k] = PatchscopeResult(
                    scope=item.scope,
                    source_position=item.source_position,
                    target_position=item.target_position,
                    logits=logits[row].cpu(),
                    top=top_k(logits[row], handle.tokenizer, top),
                    generation=texts[row],
                    informative=item.informative,
                )
    return [results[k] for k in range(len(items))]


def _prompt_pass(items: list[Resolved], handle: ModelHandle, batch: MaskedBatch, mapping):
    read, write = items[0].source_site, items[0].target_site
    reads = [pad + item.source_position for pad, item in zip(batch.pad, items)]
    writes = [pad + item.target_position for pad, item in zip(batch.pad, items)]
    if read.layer <= write.layer:  # one pass: the read site fires before (or at) the write site
        pvm = intervenable(reroute_config(read, write, handle.hidden_size, mapping), handle.model)
        next(iter(pvm.interventions.values())).reset()
        _, output = pvm(base=batch.inputs(), unit_locations=per_intervention_locations([reads, writes]))
        return output
    collector = intervenable(collect_config([read], handle.hidden_size), handle.model)
    (_, collected), _ = collector(
        base={**batch.inputs(), "use_cache": False, "logits_to_keep": 1},
        unit_locations=per_intervention_locations([reads]),
    )
    states = collected[0].reshape(len(items), 1, -1)
    patcher = intervenable(patch_config(write, handle.hidden_size, mapping), handle.model)
    _, output = patcher(
        base=batch.inputs(),
        unit_locations=per_intervention_locations([writes]),
        source_representations={patcher.sorted_keys[0]: states},
    )
    return output


def _greedy(handle: ModelHandle, output, batch: MaskedBatch, max_new_tokens: int) -> list[str]:
    """Greedy decoding from the patched prompt's KV cache; new tokens attend to every earlier real token."""
    eos = handle.tokenizer.eos_token_id
    keyword = cache_keyword(handle.model)
    cache, token = returned_cache(output), output.logits[:, -1].argmax(-1, keepdim=True)
    rows, n = token.shape[0], batch.input_ids.shape[1]
    real = torch.ones(rows, n, dtype=torch.long, device=handle.device)
    for row, pad in enumerate(batch.pad):
        real[row, :pad] = 0
    lengths = real.sum(-1, keepdim=True)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for step in range(max_new_tokens):
        for row in range(rows):
            if not done[row]:
                tokens[row].append(int(token[row]))
                done[row] = int(token[row]) == eos
        if all(done) or step == max_new_tokens - 1:
            break
        real = torch.cat([real, torch.ones(rows, 1, dtype=torch.long, device=handle.device)], dim=1)
        out = handle.model(
            input_ids=token, use_cache=True, attention_mask=real, position_ids=lengths + step, **{keyword: cache}
        )
        cache, token = returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    return handle.tokenizer.batch_decode(tokens, skip_special_tokens=True)


def cache_keyword(model: Any) -> str:
    """The keyword the model's forward takes its key/value cache by: ``cache`` in transformers 5 (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` in earlier releases."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward returned, under its current name or the earlier one (which now warns)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


__all__ = ["run_reroute", "run_reroutes", "prompt_pass", "segments", "segment_mask", "encode", "MaskedBatch"]
