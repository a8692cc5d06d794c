"""The engine: collect at the source -> map with f -> patch at the target.

Every distinct (source prompt, position) is read once, for all its source layers, in one pyvene pass.
The patch step has two executions of the same pyvene config:

- **planned** (the default, for the decoder models `stack` supports): rows that share a target prompt
  share its prefix and its unpatched lower layers, and are packed into batches under a token budget
  (`plan`); see `stack` for why this is the same computation;
- **plain**: pyvene.IntervenableModel with a `MappingIntervention`, target rows sharing a site batched
  and left-padded. It runs for other models, and on request (``planned=False``).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .compat import Site, base_locations, intervenable, per_intervention_locations, pyvene_guard
from .errors import SpecError, UninformativeScopeWarning, check_int
from .files import check_finite
from .mappings import MappingFunction, MappingSpec, build_mapping
from .models import ModelHandle
from .plan import DEFAULT_MAX_BATCH_TOKENS, check_budget, group_by_target, pack
from .positions import warn_if_sink
from .pyvene_config import Resolved, collect_config, patch_config, resolve
from .reroute import run_reroutes
from .result import PatchscopeResult, decode_top, top_k, top_k_ids
from .spec import Patchscope
from .stack import Stack

Models = Mapping[str, ModelHandle]


def as_models(model: ModelHandle | Models | Sequence[ModelHandle]) -> dict[str, ModelHandle]:
    """Accept one handle, a list of handles or a name -> handle mapping.

    Two different handles under one name are refused: a scope names its models, and picking one of the
    two silently would run another model than the one meant (e.g. an A -> B Patchscope as B -> B).
    """
    if isinstance(model, ModelHandle):
        return {model.name: model}
    items = list(model.items()) if isinstance(model, Mapping) else [(getattr(h, "name", None), h) for h in model]
    out: dict[str, ModelHandle] = {}
    for name, handle in items:
        if not isinstance(handle, ModelHandle):
            raise SpecError(f"models entry {name!r} is a {type(handle).__name__} (allowed: a ModelHandle from "
                            "load_model or wrap_model)")
        known = out.get(name)
        if known is not None and known is not handle:
            raise SpecError(f"two different models are both named {name!r} (allowed: one model per name); "
                            "name them apart with wrap_model(model, tokenizer, name=...) or pass a dict "
                            "{name: handle}")
        out[name] = handle
    if not out:
        raise SpecError("models is empty (allowed: one ModelHandle, a list of them, or a dict name -> handle)")
    return out


@dataclass
class Batch:
    """Left-padded token ids for some prompts, with explicit position ids so padding changes nothing."""

    inputs: dict[str, torch.Tensor]
    pad: list[int]  # left-padding per row: unpadded index i sits at pad + i

    @classmethod
    def encode(cls, handle: ModelHandle, prompts: Sequence[str]) -> "Batch":
        encoded = handle.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True)
        mask = encoded["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        pad = (mask.shape[1] - mask.sum(-1)).tolist()
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": mask, "position_ids": position_ids}
        return cls({k: v.to(handle.device) for k, v in inputs.items()}, pad)


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# ---- collect -----------------------------------------------------------------------------------------
def collect_states(handle: ModelHandle, prompts: Sequence[str], positions: Sequence[int], sites: Sequence[Site],
                   batch_size: int = 32) -> torch.Tensor:
    """Hidden states at (prompts[r], positions[r]) for every site, read in one pass per batch: [rows, sites, d]."""
    sites = list(sites)
    out = torch.empty(len(prompts), len(sites), handle.hidden_size, dtype=handle.model.dtype, device=handle.device)
    rows = list(range(len(prompts)))
    with pyvene_guard(handle.model), torch.no_grad():
        pvm = intervenable(collect_config(sites, handle.hidden_size), handle.model)
        for chunk in chunks(rows, batch_size):
            batch = Batch.encode(handle, [prompts[r] for r in chunk])
            where = [batch.pad[k] + positions[r] for k, r in enumerate(chunk)]
            (_, collected), _ = pvm(base={**batch.inputs, "logits_to_keep": 1},  # the head's output is unused
                                    unit_locations=per_intervention_locations([where] * len(sites)))
            # pyvene returns, per site, a [batch, 1, d] tensor (one unit per row)
            out[chunk[0]:chunk[-1] + 1] = torch.stack([states.reshape(len(chunk), -1) for states in collected], 1)
    return out


def collect(handle: ModelHandle, prompts: Sequence[str], positions: Sequence[int], sites: Sequence[Site],
            batch_size: int = 32) -> dict[tuple[int, Site], torch.Tensor]:
    """Hidden states of row r = (prompts[r], positions[r]) at every site: {(row, site): [d] tensor}."""
    sites = list(dict.fromkeys(sites))
    states = collect_states(handle, prompts, positions, sites, batch_size)
    return {(r, site): states[r, k] for r in range(len(prompts)) for k, site in enumerate(sites)}


# ---- patch -------------------------------------------------------------------------------------------
def patch(handle: ModelHandle, site: Site, prompts: Sequence[str], positions: Sequence[int],
          vectors: torch.Tensor, max_new_tokens: int = 0,
          mapping: MappingFunction | None = None) -> tuple[torch.Tensor, list[str] | None]:
    """Write f(vectors[r]) at (prompts[r], positions[r], site); return last-position logits and generations."""
    batch = Batch.encode(handle, prompts)
    where = [pad + position for pad, position in zip(batch.pad, positions)]
    if mapping is None:
        mapping = build_mapping("identity", vectors.shape[-1], handle.hidden_size)
    representation = vectors.to(handle.device).unsqueeze(1)  # [B, 1, d_source]; f runs inside the intervention
    with pyvene_guard(handle.model), torch.no_grad():
        config = patch_config(site, handle.hidden_size, mapping.to(handle.device))
        pvm = intervenable(config, handle.model)
        key = pvm.sorted_keys[0]
        if max_new_tokens == 0:
            _, output = pvm(base={**batch.inputs, "logits_to_keep": 1}, unit_locations=base_locations(where),
                            source_representations={key: representation})
            return output.logits[:, -1].float(), None
        base = {k: v for k, v in batch.inputs.items() if k != "position_ids"}  # generate derives them from the mask
        _, output = pvm.generate(
            base, unit_locations=base_locations(where), source_representations={key: representation},
            intervene_on_prompt=True, generation_config=greedy_config(handle, max_new_tokens),
        )
    new_tokens = output.sequences[:, batch.inputs["input_ids"].shape[1]:]
    texts = handle.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return output.logits[0].float(), texts


def greedy_config(handle: ModelHandle, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding with raw first-step logits returned, as the paper's readout uses."""
    tokenizer = handle.tokenizer
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            return_dict_in_generate=True, output_logits=True)


# ---- run ---------------------------------------------------------------------------------------------
def run(scopes: Patchscope | Sequence[Patchscope], model: ModelHandle | Models | Sequence[ModelHandle],
        top: int = 10, batch_size: int = 32, progress: bool | None = None,
        source_states: Sequence[torch.Tensor] | None = None, planned: bool = True,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> list[PatchscopeResult]:
    """Run Patchscopes (one or many) and return one result per scope, in order.

    ``source_states`` (one ``[d_source]`` tensor per scope) skips the collect step: the states are taken
    as already read at each scope's source, e.g. when an evaluation has read them once for many readouts.
    ``planned=False`` patches through plain pyvene even where the planned execution applies;
    ``max_batch_tokens`` bounds a planned batch (rows x (target tokens + new tokens)).
    """
    check_budget(max_batch_tokens)
    top = check_int("top", top)
    batch_size = check_int("batch_size", batch_size)
    scope_list = [scopes] if isinstance(scopes, Patchscope) else list(scopes)
    models = as_models(model)
    resolved = [resolve(scope, models) for scope in scope_list]
    if source_states is not None:
        check_source_states(source_states, resolved, models)
    warn_uninformative(resolved)
    results: list[PatchscopeResult | None] = [None] * len(resolved)
    plain = [r for r, item in enumerate(resolved) if item.scope.reroute is None]
    if plain:
        items = [resolved[r] for r in plain]
        states = _collect_all(items, models, batch_size) if source_states is None \
            else [source_states[r] for r in plain]
        plannable = {name: planned and Stack.supports(handle.model) for name, handle in models.items()}
        fast = [k for k, item in enumerate(items) if plannable[item.scope.target_model]]
        slow = [k for k, item in enumerate(items) if not plannable[item.scope.target_model]]
        if fast:
            done = _patch_planned([items[k] for k in fast], [states[k] for k in fast], models, top,
                                  max_batch_tokens, progress)
            for k, result in zip(fast, done):
                results[plain[k]] = result
        if slow:
            done = _patch_all([items[k] for k in slow], [states[k] for k in slow], models, top, batch_size, progress)
            for k, result in zip(slow, done):
                results[plain[k]] = result
    rerouted: dict[str, list[int]] = defaultdict(list)
    for r, item in enumerate(resolved):
        if item.scope.reroute is not None:
            rerouted[item.scope.source.model].append(r)
    for name, rows in rerouted.items():
        for r, result in zip(rows, run_reroutes([resolved[r] for r in rows], models[name], top, batch_size)):
            results[r] = result
    return results  # type: ignore[return-value]


def check_source_states(states: Sequence[torch.Tensor], resolved: list[Resolved], models: Models) -> None:
    """One finite ``[d_source]`` tensor per scope: NaN or inf would give silent NaN probabilities."""
    if len(states) != len(resolved):
        raise SpecError(f"source_states has {len(states)} entries for {len(resolved)} scopes "
                        "(allowed: one state per scope)")
    for k, (state, item) in enumerate(zip(states, resolved)):
        size = models[item.scope.source.model].hidden_size
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != (size,):
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise SpecError(f"source_states[{k}] has shape {shape} (allowed: a tensor of shape ({size},), the "
                            "source model's hidden size)")
        check_finite({f"source_states[{k}]": state}, "tensor")


def warn_uninformative(resolved: list[Resolved]) -> None:
    """Warn once about scopes whose patch cannot reach the readout (see `Resolved.informative`)."""
    bad = [item for item in resolved if not item.informative]
    if bad:
        first = bad[0]
        warnings.warn(
            f"{len(bad)} of {len(resolved)} Patchscope(s) write at the target's last layer (l*={first.target_layer}) "
            f"at position {first.target_position}, before the target's last ({first.target_tokens - 1}): no later "
            "layer reads that state and the readout never sees it, so their output is the same for every source "
            "(result.informative is False). Use l* below the last layer, or patch the target's last position.",
            UninformativeScopeWarning, stacklevel=3)


def _collect_all(resolved: list[Resolved], models: Models, batch_size: int) -> list[torch.Tensor]:
    """The source state h of every row (f is applied later, inside the patch intervention)."""
    mapped: list[torch.Tensor | None] = [None] * len(resolved)
    by_model: dict[str, list[int]] = defaultdict(list)
    for row, item in enumerate(resolved):
        by_model[item.scope.source.model].append(row)
    for name, rows in by_model.items():
        handle = models[name]
        units = list(dict.fromkeys((resolved[r].scope.source.prompt, resolved[r].source_position) for r in rows))
        for prompt, position in units:
            warn_if_sink(position, handle.tokenizer, prompt)
        unit_index = {unit: k for k, unit in enumerate(units)}
        states = collect(handle, [u[0] for u in units], [u[1] for u in units],
                         [resolved[r].source_site for r in rows], batch_size)
        for r in rows:
            item = resolved[r]
            mapped[r] = states[(unit_index[(item.scope.source.prompt, item.source_position)], item.source_site)]
    return mapped  # type: ignore[return-value]


def _mapped(resolved: list[Resolved], states: list[torch.Tensor], models: Models) -> list[torch.Tensor]:
    """f(h) for every row, applied per (source model, target model, mapping) as the patch intervention would."""
    out: list[torch.Tensor | None] = [None] * len(resolved)
    groups: dict[tuple[str, str, MappingSpec], list[int]] = defaultdict(list)
    for row, item in enumerate(resolved):
        groups[(item.scope.source.model, item.scope.target_model, item.scope.mapping)].append(row)
    for (source_name, target_name, spec), rows in groups.items():
        target = models[target_name]
        mapping = build_mapping(spec, models[source_name].hidden_size, target.hidden_size).to(target.device)
        with torch.no_grad():
            mapped = mapping(torch.stack([states[r] for r in rows]).to(target.device))
        for k, r in enumerate(rows):
            out[r] = mapped[k]
    return out  # type: ignore[return-value]


def _patch_planned(resolved: list[Resolved], states: list[torch.Tensor], models: Models, top: int,
                   max_batch_tokens: int, progress: bool | None) -> list[PatchscopeResult]:
    """The planned execution: per target prompt, one shared pass, then batches of rows from their l* up."""
    vectors = _mapped(resolved, states, models)
    groups = group_by_target([(r.scope.target_model, r.scope.target.prompt, r.target_position,
                               r.scope.max_new_tokens) for r in resolved])
    work = []
    for group in groups:
        handle = models[group.model]
        ids = handle.tokenizer(group.prompt, add_special_tokens=True, return_tensors="pt")["input_ids"][0]
        layers = [resolved[r].target_layer for r in group.rows]
        for batch in pack(group.rows, layers, len(ids) + group.max_new_tokens, max_batch_tokens):
            work.append((group, ids, batch))
    show = progress if progress is not None else len(work) > 8
    results: list[PatchscopeResult | None] = [None] * len(resolved)
    shared_for: dict[tuple[str, str, int], tuple[Stack, object]] = {}
    for group, ids, batch in tqdm(work, desc="patchscopes", unit="batch", disable=not show):
        handle = models[group.model]
        key = (group.model, group.prompt, group.position)
        if key not in shared_for:
            stack = Stack(handle.model)
            shared_for = {key: (stack, stack.share(ids, group.position))}  # one target prompt held at a time
        stack, shared = shared_for[key]
        decoded = stack.patched(
            shared, torch.stack([vectors[r] for r in batch]),
            torch.tensor([resolved[r].target_layer for r in batch]),
            max_new_tokens=group.max_new_tokens, eos_token_id=handle.tokenizer.eos_token_id,
            after_norm=torch.tensor([resolved[r].target_site.after_final_norm for r in batch]),
        )
        texts = None if decoded.tokens is None else \
            handle.tokenizer.batch_decode(decoded.tokens, skip_special_tokens=True)
        probs, ids = (t.tolist() for t in top_k_ids(decoded.logits, top))
        logits = decoded.logits.cpu()
        for k, r in enumerate(batch):
            results[r] = PatchscopeResult(
                scope=resolved[r].scope, source_position=resolved[r].source_position,
                target_position=resolved[r].target_position, logits=logits[k],
                top=decode_top(handle.tokenizer, probs[k], ids[k]), generation=None if texts is None else texts[k],
                informative=resolved[r].informative,
            )
    return results  # type: ignore[return-value]


def _patch_all(resolved: list[Resolved], states: list[torch.Tensor], models: Models, top: int,
               batch_size: int, progress: bool | None) -> list[PatchscopeResult]:
    groups: dict[tuple[str, str, Site, int, MappingSpec], list[int]] = defaultdict(list)
    for row, item in enumerate(resolved):
        scope = item.scope
        groups[(scope.source.model, scope.target_model, item.target_site, scope.max_new_tokens,
                scope.mapping)].append(row)
    work = [(key, chunk) for key, rows in groups.items() for chunk in chunks(rows, batch_size)]
    show = progress if progress is not None else len(work) > 8
    results: list[PatchscopeResult | None] = [None] * len(resolved)
    for (source_name, name, site, max_new_tokens, spec), chunk in tqdm(work, desc="patchscopes", unit="batch",
                                                                       disable=not show):
        handle = models[name]
        mapping = build_mapping(spec, models[source_name].hidden_size, handle.hidden_size)
        logits, texts = patch(handle, site, [resolved[r].scope.target.prompt for r in chunk],
                              [resolved[r].target_position for r in chunk],
                              torch.stack([states[r] for r in chunk]), max_new_tokens, mapping)
        for k, r in enumerate(chunk):
            results[r] = PatchscopeResult(
                scope=resolved[r].scope, source_position=resolved[r].source_position,
                target_position=resolved[r].target_position, logits=logits[k].cpu(),
                top=top_k(logits[k], handle.tokenizer, top), generation=None if texts is None else texts[k],
                informative=resolved[r].informative,
            )
    return results  # type: ignore[return-value]
