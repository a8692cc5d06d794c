"""One unit of a sweep: its source prompts' cells computed, by the planned grid or one spec per cell through `run`.

`run_unit(grid, prompts)` returns the unit's tensors shaped [prompts, Ls, columns, ...] on the CPU. The planned
path reads each prompt's source once at every needed source layer, builds each f once, and patches every
(prompt, l, l*) row in the planned execution; cells it cannot take (targets that differ by prompt, a reroute,
a family `stack` does not support) run through `run`.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from ..errors import UninformativeScopeWarning
from ..plan.grid import Cells, Grid
from ..resolve import resolve
from ..spec import Patchscope
from ..spec.positions import token_ids, warn_if_sink
from ..spec.writes import Slots, row_alphas
from .engine import run
from .plain import collect_states
from .planned import TargetRows, run_planned, use_planned


def run_unit(grid: Grid, prompts: Sequence[str]) -> dict[str, Any]:
    """One unit of source prompts, all its cells: tensors shaped [prompts, Ls, columns, ...] (on the CPU)."""
    cells = grid.cells(prompts[0])
    first = cells.templates[0][0]
    if not (
        grid.planned
        and _plannable(
            cells, [grid.make(p, first.scope.source.layer, first.scope.target.layer) for p in prompts], grid.models
        )
    ):
        return _unit_by_scopes(prompts, grid)
    return _unit_planned(prompts, grid, cells)


def _plannable(cells: Cells, per_prompt: list[Patchscope], models) -> bool:
    """Whether the cells can run as one planned grid: one target prompt and position for every prompt and
    cell (cells differ in l, l* and f only), no reroute, and a model `stack` supports."""
    first = cells.templates[0][0].scope

    def key(scope: Patchscope) -> tuple:
        target = scope.target
        return target.prompt, target.position, target.write, target.alpha, scope.target_model, scope.max_new_tokens

    def same(scope: Patchscope) -> bool:
        return key(scope) == key(first) and scope.reroute is None

    return (
        use_planned(models[first.target_model].model)
        and all(same(cell.scope) for row in cells.templates for cell in row)
        and all(same(scope) for scope in per_prompt)
    )


def _unit_planned(prompts: Sequence[str], grid: Grid, cells: Cells) -> dict[str, Any]:
    n_source, n_target = cells.shape
    first = cells.templates[0][0]
    models = grid.models
    source = models[first.scope.source.model]
    target = models[first.scope.target_model]
    # the source: every prompt resolved once (its position i) and read once, at every needed source layer
    scopes = [grid.make(p, first.scope.source.layer, first.scope.target.layer) for p in prompts]
    positions = [resolve(s, models).source_position for s in scopes]
    for scope, position in zip(scopes, positions):
        warn_if_sink(position, source.tokenizer, scope.prompt_source.prompt)
    sites = [row[0].source_site for row in cells.templates]
    states = collect_states(source, prompts, positions, sites, grid.forward_batch)  # [n, Ls, d]
    # f per (mapping, source layer): identity cells share one table
    specs: dict[tuple[Any, int], int] = {}
    pair = torch.empty(n_source, n_target, dtype=torch.long)
    for i, row in enumerate(cells.templates):
        for j, cell in enumerate(row):
            pair[i, j] = specs.setdefault((cell.scope.mapping, i), len(specs))
    with torch.no_grad():
        table = torch.stack(
            [grid.mapping(spec, source, target)(states[:, i].to(target.device)).to(target.dtype) for (spec, i) in specs]
        )  # [pairs, n, d_target]
    # the target: rows (prompt, l, l*) in that order, run by the one planned driver
    per_prompt = n_source * n_target

    def vectors(index: torch.Tensor) -> torch.Tensor:
        return table[pair.view(-1)[index % per_prompt], index // per_prompt]

    n = len(prompts)
    layers = torch.tensor([[c.target_layer for c in row] for row in cells.templates])  # [Ls, Lt]
    after = torch.tensor([[c.target_site.after_final_norm for c in row] for row in cells.templates])
    rows = TargetRows(
        ids=torch.tensor(token_ids(target.tokenizer, first.scope.target.prompt)),
        position=first.target_position,
        layers=layers.view(-1).repeat(n),
        after_norm=after.view(-1).repeat(n),
        vectors=vectors,
        max_new_tokens=first.scope.max_new_tokens,
        slots=Slots(tuple(slot - first.target_position for slot in first.slots), first.scope.target.write),
        alphas=row_alphas([first.scope.target.alpha] * (layers.numel() * n)),
    )
    out = run_planned(
        target.model,
        rows,
        grid.top,
        grid.max_batch_tokens,
        target.tokenizer.eos_token_id,
        keep_logits=grid.keep_logits,
        shared=grid.shared,
        pad_token_id=target.tokenizer.pad_token_id,
    )
    shape = (n, n_source, n_target)
    k = out.top_ids.shape[-1]
    return {
        "top_probs": out.top_probs.reshape(*shape, k),
        "top_ids": out.top_ids.reshape(*shape, k),
        "logits": None if out.logits is None else out.logits.reshape(*shape, -1),
        "generations": None
        if out.tokens is None
        else target.tokenizer.batch_decode(out.tokens, skip_special_tokens=True),
        "source_positions": positions,
        "target_positions": torch.full(shape, first.target_position, dtype=torch.long),
        "informative": torch.tensor([[c.informative for c in row] for row in cells.templates])
        .expand(n, -1, -1)
        .clone(),
    }


def _unit_by_scopes(prompts: Sequence[str], grid: Grid) -> dict[str, Any]:
    """Cells whose targets differ by prompt (e.g. the logit lens) or reroute: one spec per cell through `run`."""
    pairs = grid.pairs
    scopes = [grid.make(p, l, t) for p in prompts for row in pairs for l, t in row]
    with warnings.catch_warnings():  # a sweep marks such cells (SweepResult.informative) instead
        warnings.simplefilter("ignore", UninformativeScopeWarning)
        results = run(
            scopes,
            grid.models,
            top=grid.top,
            batch_size=grid.forward_batch,
            progress=False,
            planned=grid.planned,
            max_batch_tokens=grid.max_batch_tokens,
        )
    shape = (len(prompts), len(pairs), len(pairs[0]))
    k = min(grid.top, len(results[0].top))
    return {
        "top_probs": torch.tensor([[t.prob for t in r.top[:k]] for r in results]).reshape(*shape, k),
        "top_ids": torch.tensor([[t.token_id for t in r.top[:k]] for r in results]).reshape(*shape, k),
        "logits": torch.stack([r.kept_logits.float() for r in results]).reshape(*shape, -1)
        if grid.keep_logits
        else None,
        "generations": None if results[0].generation is None else [r.generation for r in results],
        "source_positions": [results[q * shape[1] * shape[2]].source_position for q in range(len(prompts))],
        "target_positions": torch.tensor([r.target_position for r in results]).reshape(shape),
        "informative": torch.tensor([r.informative for r in results]).reshape(shape),
    }


__all__ = ["run_unit"]
