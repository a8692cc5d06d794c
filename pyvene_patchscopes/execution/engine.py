"""The engine: collect at the source -> map with f -> patch at the target, for a list of Patchscopes.

Every distinct (source prompt, position) is read once, for all its source layers, in one pyvene pass.
The patch step has two executions of the same pyvene config (see `execution`):

- **planned** (the default, for the families `architectures` marks so): rows that share a target prompt
  share its prefix and its unpatched lower layers, and are packed into batches under a token budget;
  `execution.planned` drives it, `execution.stack` explains why it is the same computation;
- **plain**: pyvene.IntervenableModel with a `MappingIntervention`, target rows sharing a site batched
  and left-padded (`execution.plain`). It runs for other models, and on request (``planned=False``).

CoT Patchscopes (``reroute``) run in `execution.reroute`. Beside every vector reading, the target prompt is read
once unpatched (the null reading, `execution.unpatched`); a NaN readout the write caused is refused there.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..core.files import check_finite
from ..errors import SpecError, check_int
from ..models import ModelHandle
from ..plan.batching import chunks
from ..plan.rows import DEFAULT_MAX_BATCH_TOKENS, check_budget, group_by_target
from ..resolve import Models, Resolved, as_models, resolve, warn_uninformative
from ..result import PatchscopeResult, decode_top, entropy_of, top_k
from ..spec import Patchscope, VectorSource
from ..spec.mappings import MappingSpec, build_mapping
from ..spec.positions import token_ids
from ..spec.writes import Slots, row_alphas
from .plain import patch
from .planned import SharedPrompts, TargetRows, run_planned, use_planned
from .reroute import run_reroutes
from .states import read_states
from .unpatched import check_readouts, null_readings


# ---- run ---------------------------------------------------------------------------------------------
def run(
    scopes: Patchscope | Sequence[Patchscope],
    model: ModelHandle | Models | Sequence[ModelHandle],
    top: int = 10,
    batch_size: int = 32,
    progress: bool | None = None,
    source_states: Sequence[torch.Tensor] | None = None,
    planned: bool = True,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    keep_logits: bool = True,
    keep_scores: bool = False,
) -> list[PatchscopeResult]:
    """Run Patchscopes (one or many) and return one result per scope, in order.

    ``source_states`` (one ``[d_source]`` tensor per scope) skips the collect step: the states are taken
    as already read at each scope's source, e.g. when an evaluation has read them once for many readouts.
    ``planned=False`` patches through plain pyvene even where the planned execution applies;
    ``max_batch_tokens`` bounds a planned batch (rows x (target tokens + new tokens), and rows x vocabulary
    for the head). ``keep_logits=False`` leaves each result's full-vocabulary ``logits`` out (None), keeping
    its top tokens and generation: what a run of many scopes on a large-vocabulary model needs.
    ``keep_scores=True`` fills each result's `entropy` (of the next token) and `final_state` (the target's last
    block output at the end of T): what the scale search scores (`scales`).
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
    results: dict[int, PatchscopeResult] = {}  # row -> its readout, every row filled below
    plain = [r for r, item in enumerate(resolved) if item.scope.reroute is None]
    if plain:
        items = [resolved[r] for r in plain]
        states = _collect_all(items, models, batch_size) if source_states is None else [source_states[r] for r in plain]
        targets = dict.fromkeys(item.scope.target_model for item in items)
        plannable = {name: use_planned(models[name].model, planned) for name in targets}
        fast = [k for k, item in enumerate(items) if plannable[item.scope.target_model]]
        slow = [k for k, item in enumerate(items) if not plannable[item.scope.target_model]]
        vectors = [k for k, item in enumerate(items) if item.scope.vector_source]
        # f(h) once per row: the planned path writes it, the null reading checks a vector's norm on it; the plain
        # path applies f inside its pyvene intervention, so only its vector rows are mapped here
        to_map = sorted({*fast, *vectors})
        mapped = dict(zip(to_map, _mapped([items[k] for k in to_map], [states[k] for k in to_map], models)))
        nulls = null_readings([items[k] for k in vectors], [mapped[k] for k in vectors], models, top)
        if fast:
            done = _patch_planned(
                [items[k] for k in fast],
                [mapped[k] for k in fast],
                models,
                top,
                max_batch_tokens,
                progress,
                keep_logits,
                keep_scores,
            )
            for k, result in zip(fast, done):
                results[plain[k]] = result
        if slow:
            done = _patch_all(
                [items[k] for k in slow],
                [states[k] for k in slow],
                models,
                top,
                batch_size,
                progress,
                keep_logits,
                keep_scores,
            )
            for k, result in zip(slow, done):
                results[plain[k]] = result
        for k, null in zip(vectors, nulls):
            results[plain[k]].null_top, results[plain[k]].null_generation = null.top, null.generation
    rerouted: dict[str, list[int]] = defaultdict(list)
    for r, item in enumerate(resolved):
        if item.scope.reroute is not None:
            rerouted[item.scope.source.model].append(r)
    for name, rows in rerouted.items():
        for r, result in zip(rows, run_reroutes([resolved[r] for r in rows], models[name], top, batch_size)):
            results[r] = result
    readouts = [results[r] for r in range(len(resolved))]
    check_readouts(resolved, readouts, models)
    if not keep_logits:
        for readout in readouts:
            readout.logits = None  # keep_logits=False drops them
    return readouts


def check_source_states(states: Sequence[torch.Tensor], resolved: list[Resolved], models: Models) -> None:
    """One finite ``[d_source]`` tensor per scope: NaN or inf would give silent NaN probabilities."""
    if len(states) != len(resolved):
        raise SpecError(
            f"source_states has {len(states)} entries for {len(resolved)} scopes (allowed: one state per scope)"
        )
    for k, (state, item) in enumerate(zip(states, resolved)):
        size = models[item.scope.source.model].hidden_size
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != (size,):
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise SpecError(
                f"source_states[{k}] has shape {shape} (allowed: a tensor of shape ({size},), the "
                "source model's hidden size)"
            )
        check_finite({f"source_states[{k}]": state}, "tensor", models[item.scope.source.model].dtype)


def _collect_all(resolved: list[Resolved], models: Models, batch_size: int) -> list[torch.Tensor]:
    """The source state h of every row (f is applied later: by `_mapped`, or inside the plain path's intervention);
    a vector source's state is its vector, on the source model's device and in its dtype, as a read state would be."""
    mapped: dict[int, torch.Tensor] = {}  # row -> its state, every row filled below
    by_model: dict[str, list[int]] = defaultdict(list)
    for row, item in enumerate(resolved):
        if isinstance(item.scope.source, VectorSource):
            handle = models[item.scope.source.model]
            mapped[row] = item.scope.source.tensor.to(handle.device, handle.dtype)
        else:
            by_model[item.scope.source.model].append(row)
    for name, rows in by_model.items():
        sites = {site: k for k, site in enumerate(dict.fromkeys(resolved[r].source_site for r in rows))}
        read = read_states(
            models[name],
            [(resolved[r].scope.prompt_source.prompt, resolved[r].source_position) for r in rows],
            list(sites),
            batch_size,
        )
        for k, r in enumerate(rows):  # a view of the unit's row: many rows share one source state, never copied
            mapped[r] = read.states[read.rows[k], sites[resolved[r].source_site]]
    return [mapped[r] for r in range(len(resolved))]


def _mapped(resolved: list[Resolved], states: list[torch.Tensor], models: Models) -> list[torch.Tensor]:
    """f(h) for every row, applied per (source model, target model, mapping) as the patch intervention would."""
    out: dict[int, torch.Tensor] = {}  # row -> f(h), every row filled below
    groups: dict[tuple[str, str, MappingSpec, tuple[int, ...]], list[int]] = defaultdict(list)
    for row, item in enumerate(resolved):
        groups[
            (item.scope.source.model, item.scope.target_model, item.scope.mapping_spec, tuple(states[row].shape))
        ].append(row)
    for (source_name, target_name, spec, _), rows in groups.items():
        target = models[target_name]
        mapping = build_mapping(spec, models[source_name].hidden_size, target.hidden_size).to(target.device)
        with torch.no_grad():
            mapped = mapping(torch.stack([states[r] for r in rows]).to(target.device))
        for k, r in enumerate(rows):
            out[r] = mapped[k]
    return [out[r] for r in range(len(resolved))]


def _patch_planned(
    resolved: list[Resolved],
    vectors: list[torch.Tensor],
    models: Models,
    top: int,
    max_batch_tokens: int,
    progress: bool | None,
    keep_logits: bool = True,
    keep_scores: bool = False,
) -> list[PatchscopeResult]:
    """The planned execution of rows whose f(h) is `vectors` (`_mapped`): per target prompt, one shared pass,
    then batches of rows from their l* up."""
    groups = group_by_target(
        [
            (
                r.scope.target_model,
                r.scope.target.prompt,
                r.target_position,
                r.scope.max_new_tokens,
                r.slots,
                r.scope.target.write,
            )
            for r in resolved
        ]
    )
    results: dict[int, PatchscopeResult] = {}  # row -> its readout, every row filled below
    shared = SharedPrompts()
    show = progress if progress is not None else len(resolved) > 256
    with tqdm(total=len(resolved), desc="patchscopes", unit="scope", disable=not show) as bar:
        for group in groups:
            handle = models[group.model]
            target_rows = TargetRows(
                ids=torch.tensor(token_ids(handle.tokenizer, group.prompt)),
                position=group.position,
                layers=torch.tensor([resolved[r].target_layer for r in group.rows]),
                after_norm=torch.tensor([resolved[r].target_site.after_final_norm for r in group.rows]),
                vectors=partial(_rows_of, vectors, group.rows),
                max_new_tokens=group.max_new_tokens,
                slots=Slots(tuple(slot - group.position for slot in group.slots), group.mode),
                alphas=row_alphas([resolved[r].scope.target.alpha for r in group.rows]),
                keep_scores=keep_scores,
            )
            out = run_planned(
                handle.model,
                target_rows,
                top,
                max_batch_tokens,
                handle.tokenizer.eos_token_id,
                shared=shared,
                on_batch=bar.update,
                pad_token_id=handle.tokenizer.pad_token_id,
                keep_logits=keep_logits,
            )
            texts = None if out.tokens is None else handle.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
            probs, ids = out.top_probs.tolist(), out.top_ids.tolist()
            for k, r in enumerate(group.rows):
                results[r] = PatchscopeResult(
                    scope=resolved[r].scope,
                    source_position=resolved[r].source_position,
                    target_position=resolved[r].target_position,
                    logits=None if out.logits is None else out.logits[k],
                    top=decode_top(handle.tokenizer, probs[k], ids[k]),
                    generation=None if texts is None else texts[k],
                    informative=resolved[r].informative,
                    generated_ids=None if out.tokens is None else list(out.tokens[k]),
                    entropy=float(out.entropy[k]) if out.entropy is not None else None,
                    final_state=None if out.states is None else out.states[k],
                )
    return [results[r] for r in range(len(resolved))]


def _rows_of(vectors: list[torch.Tensor], rows: Sequence[int], index: torch.Tensor) -> torch.Tensor:
    """The vectors of a group's rows `index` (positions in `rows`), stacked as `TargetRows.vectors` gives them."""
    return stack_vectors([vectors[rows[i]] for i in index.tolist()])


def stack_vectors(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Rows' vectors as one tensor: [n, d]; or [n, slots, d] when any row has one vector per slot (a row with
    one vector for all its slots is repeated at each)."""
    if all(v.ndim == 1 for v in vectors):
        return torch.stack(vectors)
    slots = next(v.shape[0] for v in vectors if v.ndim == 2)
    return torch.stack([v if v.ndim == 2 else v[None].expand(slots, -1) for v in vectors])


def _patch_all(
    resolved: list[Resolved],
    states: list[torch.Tensor],
    models: Models,
    top: int,
    batch_size: int,
    progress: bool | None,
    keep_logits: bool = True,
    keep_scores: bool = False,
) -> list[PatchscopeResult]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for row, item in enumerate(resolved):
        scope = item.scope
        groups[
            (
                scope.source.model,
                scope.target_model,
                item.target_site,
                scope.max_new_tokens,
                scope.mapping,
                len(item.slots),
                scope.target.write,
                scope.target.alpha,
            )
        ].append(row)
    work = [(key, chunk) for key, rows in groups.items() for chunk in chunks(rows, batch_size)]
    show = progress if progress is not None else len(work) > 8
    results: dict[int, PatchscopeResult] = {}  # row -> its readout, every row filled below
    for (source_name, name, site, max_new_tokens, spec, _, write, alpha), chunk in tqdm(
        work, desc="patchscopes", unit="batch", disable=not show
    ):
        handle = models[name]
        mapping = build_mapping(spec, models[source_name].hidden_size, handle.hidden_size)
        logits, texts, tokens, kept = patch(
            handle,
            site,
            [resolved[r].scope.target.prompt for r in chunk],
            [resolved[r].slots for r in chunk],
            stack_vectors([states[r] for r in chunk]),
            max_new_tokens,
            mapping,
            write,
            alpha,
            keep_scores,
        )
        entropy = entropy_of(logits).tolist() if keep_scores else None
        for k, r in enumerate(chunk):
            results[r] = PatchscopeResult(
                scope=resolved[r].scope,
                source_position=resolved[r].source_position,
                target_position=resolved[r].target_position,
                logits=logits[k].cpu() if keep_logits else None,
                top=top_k(logits[k], handle.tokenizer, top),
                generation=None if texts is None else texts[k],
                informative=resolved[r].informative,
                generated_ids=None if tokens is None else tokens[k],
                entropy=None if entropy is None else entropy[k],
                final_state=None if kept is None else kept[k],
            )
    return [results[r] for r in range(len(resolved))]
