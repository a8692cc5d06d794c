"""The plain path: collect and patch through pyvene's IntervenableModel, target rows batched and left-padded.

It runs every model pyvene can hook, and on request (``run(..., planned=False)``). Generation is
pyvene's ``generate`` with the patch on the prompt pass only, greedy, as the paper's readout is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Sequence

import torch
from transformers import GenerationConfig

from ..compat import base_locations, intervenable, per_intervention_locations, pyvene_guard
from ..models import ModelHandle
from ..models.sites import Site
from ..plan.batching import Batch, exact_chunks, exact_groups
from ..plan.pyvene_config import collect_config, patch_config
from ..spec.mappings import MappingFunction, build_mapping


# ---- collect at the source -----------------------------------------------------------------------------------------
def collect_states(
    handle: ModelHandle, prompts: Sequence[str], positions: Sequence[int], sites: Sequence[Site], batch_size: int = 32
) -> torch.Tensor:
    """Hidden states at (prompts[r], positions[r]) for every site, read in one pass per batch: [rows, sites, d]."""
    sites = list(sites)
    out = torch.empty(len(prompts), len(sites), handle.hidden_size, dtype=handle.model.dtype, device=handle.device)
    with pyvene_guard(handle.model), torch.no_grad():
        pvm = intervenable(collect_config(sites, handle.hidden_size), handle.model)
        for chunk in exact_chunks(handle, prompts, batch_size):
            batch = Batch.encode(handle, [prompts[r] for r in chunk])
            where = [batch.pad[k] + positions[r] for k, r in enumerate(chunk)]
            (_, collected), _ = pvm(
                base={**batch.inputs, "logits_to_keep": 1},  # the head's output is unused
                unit_locations=per_intervention_locations([where] * len(sites)),
            )
            # pyvene returns, per site, a [batch, 1, d] tensor (one unit per row)
            out[torch.tensor(chunk, device=out.device)] = torch.stack(
                [states.reshape(len(chunk), -1) for states in collected], 1
            )
    return out


# ---- patch at the target -------------------------------------------------------------------------------------------
def patch(
    handle: ModelHandle,
    site: Site,
    prompts: Sequence[str],
    positions: Sequence[int | Sequence[int]],
    vectors: torch.Tensor,
    max_new_tokens: int = 0,
    mapping: MappingFunction | None = None,
    write: str = "replace",
    alpha: float = 1.0,
    keep_states: bool = False,
) -> Patched:
    """Write f(vectors[r]) at (prompts[r], positions[r], site); return last-position logits, generations and
    their token ids (per row up to and including EOS, as the planned path gives them).

    positions[r] may be several slots (as many in every row); vectors is [rows, d], or [rows, slots, d] with one
    vector per slot. `write` and `alpha` choose the write mode (`writes`). ``keep_states`` also returns each row's
    last block output at the end of its prompt, on the prompt pass (`last_block_states`)."""
    groups = exact_groups(handle, prompts)
    if len(groups) > 1:  # padding would shift this model's positions: one call per prompt length
        parts = [
            (
                g,
                patch(
                    handle,
                    site,
                    [prompts[r] for r in g],
                    [positions[r] for r in g],
                    vectors[g],
                    max_new_tokens,
                    mapping,
                    write,
                    alpha,
                    keep_states,
                ),
            )
            for g in groups
        ]
        order = torch.argsort(torch.tensor([r for g, _ in parts for r in g])).tolist()
        logits = torch.cat([part.logits for _, part in parts])[order]
        states = torch.cat([part.states for _, part in parts])[order] if keep_states else None  # type: ignore[misc]  # keep_states: set
        if not max_new_tokens:
            return Patched(logits, None, None, states)
        texts = [text for _, part in parts for text in part.texts]  # type: ignore[union-attr]  # max_new_tokens: texts set
        tokens = [ids for _, part in parts for ids in part.tokens]  # type: ignore[union-attr]  # max_new_tokens: tokens set
        return Patched(logits, [texts[k] for k in order], [tokens[k] for k in order], states)
    batch = Batch.encode(handle, prompts)
    slots = [list(p) if isinstance(p, Sequence) else [p] for p in positions]
    where = [[pad + q for q in row] for pad, row in zip(batch.pad, slots)]
    if mapping is None:
        mapping = build_mapping("identity", vectors.shape[-1], handle.hidden_size)
    units = len(slots[0])
    representation = vectors.to(handle.device)  # [B, units, d_source]; f runs inside the intervention
    representation = (
        representation.unsqueeze(1).expand(-1, units, -1) if representation.ndim == 2 else representation
    ).contiguous()
    ends = torch.full((len(prompts),), batch.inputs["input_ids"].shape[1] - 1)  # the end of T (left-padded)
    with pyvene_guard(handle.model), torch.no_grad(), last_block_states(handle.model, ends, keep_states) as seen:
        config = patch_config(site, handle.hidden_size, mapping.to(handle.device), write, alpha, units)
        pvm = intervenable(config, handle.model)
        key = pvm.sorted_keys[0]
        if max_new_tokens == 0:
            _, output = pvm(
                base={**batch.inputs, "logits_to_keep": 1},
                unit_locations=base_locations(where),
                source_representations={key: representation},
            )
            return Patched(output.logits[:, -1].float(), None, None, seen.get("states"))
        base = {k: v for k, v in batch.inputs.items() if k != "position_ids"}  # generate derives them from the mask
        _, output = pvm.generate(
            base,
            unit_locations=base_locations(where),
            source_representations={key: representation},
            intervene_on_prompt=True,
            generation_config=greedy_config(handle, max_new_tokens),
        )
    new_tokens = output.sequences[:, batch.inputs["input_ids"].shape[1] :]
    texts = handle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    tokens = [until_eos(row, handle.tokenizer.eos_token_id) for row in new_tokens.tolist()]
    return Patched(output.logits[0].float(), texts, tokens, seen.get("states"))


class Patched(NamedTuple):
    """What `patch` returns: last-position logits, and generations with their ids (None without generation)."""

    logits: torch.Tensor
    texts: list[str] | None
    tokens: list[list[int]] | None
    states: torch.Tensor | None = None  # [rows, d] the last block's output at the end of each row's prompt, when kept


@contextmanager
def last_block_states(model: torch.nn.Module, positions: torch.Tensor, keep: bool) -> Iterator[dict]:
    """While open, keep the last block's output (after any write there) at `positions` (one per row) on the first
    pass over the prompt, in ``seen["states"]``; nothing when not `keep`.

    It is read as the final norm's input (a pre-hook there runs after every hook on the last block, pyvene's
    included); a model whose final norm is shared or absent is read on its last block's output instead."""
    seen: dict = {}
    if not keep:
        yield seen
        return
    from ..models.architectures import architecture

    arch = architecture(model)

    def keep_rows(hidden: torch.Tensor) -> None:
        if "states" not in seen and hidden.shape[1] > int(positions.max()):
            seen["states"] = hidden[torch.arange(hidden.shape[0]), positions.to(hidden.device)].detach().float().cpu()

    if arch.final_norm and not arch.final_norm_shared:
        handle = arch.module(model, arch.final_norm).register_forward_pre_hook(lambda m, args: keep_rows(args[0]))
    else:
        handle = arch.blocks(model)[-1].register_forward_hook(
            lambda m, args, out: keep_rows(out[0] if isinstance(out, tuple) else out)
        )
    try:
        yield seen
    finally:
        handle.remove()


def until_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    """A row of generated ids cut after its first EOS (what follows is padding)."""
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


def greedy_config(handle: ModelHandle, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding with raw first-step logits returned, as the paper's readout uses."""
    tokenizer = handle.tokenizer
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )


__all__ = ["collect_states", "patch", "greedy_config"]
