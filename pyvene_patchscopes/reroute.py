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

from dataclasses import dataclass
from typing import Any

import torch

from .compat import intervenable, per_intervention_locations, pyvene_guard
from .mappings import build_mapping
from .models import ModelHandle
from .pyvene_config import Resolved, collect_config, patch_config, reroute_config
from .result import PatchscopeResult, top_k


@dataclass
class MaskedPrompt:
    """One tokenised prompt with its (optional) segment mask, ready for the model."""

    input_ids: torch.Tensor  # [1, n]
    attention_mask: torch.Tensor  # [1, n] of ones, or [1, 1, n, n] additive when segments are isolated
    position_ids: torch.Tensor  # [1, n]

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "use_cache": True}


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


def encode(handle: ModelHandle, prompt: str, split: int | None) -> MaskedPrompt:
    ids = handle.tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"].to(handle.device)
    n = ids.shape[1]
    if split is None:
        mask = torch.ones(1, n, dtype=torch.long, device=handle.device)
    else:
        mask = segment_mask(segments(handle, prompt, split), handle.dtype).to(handle.device)
    return MaskedPrompt(ids, mask, torch.arange(n, device=handle.device)[None])


def prompt_pass(item: Resolved, handle: ModelHandle) -> tuple[Any, int]:
    """The patched prompt pass of a CoT Patchscope: (model output with logits at every position, length)."""
    sequence = encode(handle, item.scope.source.prompt, item.scope.reroute.split)
    mapping = build_mapping(item.scope.mapping, handle.hidden_size, handle.hidden_size).to(handle.device)
    with pyvene_guard(handle.model), torch.no_grad():
        return _prompt_pass(item, handle, sequence, mapping), sequence.input_ids.shape[1]


def run_reroute(item: Resolved, handle: ModelHandle, top: int = 10) -> PatchscopeResult:
    """Run one CoT Patchscope: the prompt pass with the reroute, then greedy decoding with the KV cache.

    With isolated segments the write at i* cannot reach the prompt's last position, so the next-token
    ``top`` is the unpatched one; the generation (whose tokens see i*) is the readout.
    """
    scope = item.scope
    output, length = prompt_pass(item, handle)
    with pyvene_guard(handle.model), torch.no_grad():
        logits = output.logits[0, -1].float()
        generation = None
        if scope.max_new_tokens:
            generation = _greedy(handle, output, length, scope.max_new_tokens)
    return PatchscopeResult(scope=scope, source_position=item.source_position, target_position=item.target_position,
                            logits=logits.cpu(), top=top_k(logits, handle.tokenizer, top), generation=generation)


def _prompt_pass(item: Resolved, handle: ModelHandle, sequence: MaskedPrompt, mapping):
    read, write = item.source_site, item.target_site
    if read.layer <= write.layer:  # one pass: the read site fires before (or at) the write site
        pvm = intervenable(reroute_config(read, write, handle.hidden_size, mapping), handle.model)
        next(iter(pvm.interventions.values())).reset()
        _, output = pvm(base=sequence.inputs(),
                        unit_locations=per_intervention_locations([[item.source_position], [item.target_position]]))
        return output
    collector = intervenable(collect_config([read], handle.hidden_size), handle.model)
    (_, collected), _ = collector(base=sequence.inputs(),
                                  unit_locations=per_intervention_locations([[item.source_position]]))
    state = collected[0].reshape(1, 1, -1)
    patcher = intervenable(patch_config(write, handle.hidden_size, mapping), handle.model)
    _, output = patcher(base=sequence.inputs(), unit_locations=per_intervention_locations([[item.target_position]]),
                        source_representations={patcher.sorted_keys[0]: state})
    return output


def _greedy(handle: ModelHandle, output, prompt_length: int, max_new_tokens: int) -> str:
    """Greedy decoding from the patched prompt's KV cache; new tokens attend to every earlier token."""
    cache, token = output.past_key_values, output.logits[:, -1].argmax(-1, keepdim=True)
    tokens = []
    for step in range(max_new_tokens):
        tokens.append(int(token))
        if token.item() == handle.tokenizer.eos_token_id:
            break
        length = prompt_length + step + 1
        out = handle.model(input_ids=token, past_key_values=cache, use_cache=True,
                           attention_mask=torch.ones(1, length, dtype=torch.long, device=handle.device),
                           position_ids=torch.tensor([[length - 1]], device=handle.device))
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return handle.tokenizer.decode(tokens, skip_special_tokens=True)


__all__ = ["run_reroute", "prompt_pass", "segments", "segment_mask", "encode"]
