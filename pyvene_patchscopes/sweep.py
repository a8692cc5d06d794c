"""Sweeps: many source prompts x (source layer, target layer) pairs in one call, returned as a grid.

The sweep is planned as a whole. Source prompts go in units of ``batch_size``; each unit reads every
needed source layer in one pass, then all its (prompt, l, l*) rows are patched by the planned
execution (`execution.planned`): one shared pass of the target prompt, rows packed under ``max_batch_tokens``,
each row computing only from its l* up. Results stay as tensors (top-k ids and probabilities per
cell); `PatchscopeResult` objects are built only when asked for.

Under ``accelerate launch`` the units are split over the processes (`execution.distributed`); every unit is
computed exactly as in one process, so the result is the same bit for bit.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .engine import run
from .errors import SpecError, UninformativeScopeWarning, as_index, check_int
from .execution.batching import chunks
from .execution.distributed import gather_units, my_units
from .execution.plain import collect_states
from .execution.plan import DEFAULT_MAX_BATCH_TOKENS, check_budget
from .execution.planned import SharedPrompts, TargetRows, run_planned, use_planned
from .execution.check import stack_for
from .mappings import build_mapping
from .models import ModelHandle
from .positions import token_ids, warn_if_sink
from .presets import get_preset
from .resolve import Resolved, as_models, resolve
from .result import PatchscopeResult, decode_top
from .spec import Patchscope, Position, Source


@dataclass
class SweepResult:
    """A sweep's cells, indexed [prompt, source layer, target layer]; results are built on demand."""

    preset: str
    prompts: list[str]
    source_layers: list[int]
    target_layers: list[int]
    top_probs: torch.Tensor              # [P, Ls, Lt, k]
    top_ids: torch.Tensor                # [P, Ls, Lt, k]
    source_positions: list[int]
    target_positions: torch.Tensor       # [P, Ls, Lt]
    scope_for: Callable[[int, int, int], Patchscope] = field(repr=False)
    tokenizer: Any = field(repr=False)
    same_layer: bool = False              # target_layers="same": one cell per source layer, l* = l
    generations: list[str] | None = None  # flattened in cell order
    logits: torch.Tensor | None = field(default=None, repr=False)  # [P, Ls, Lt, vocab] when kept
    # [P, Ls, Lt] bool: False where the patch cannot reach the readout (l* = the last layer, written before the
    # target's last position), so the cell says nothing about the source
    informative: torch.Tensor | None = field(default=None, repr=False)
    _results: list[PatchscopeResult] | None = field(default=None, repr=False)

    @property
    def columns(self) -> int:
        return 1 if self.same_layer else len(self.target_layers)

    def _index(self, prompt: int, source_layer: int, target_layer: int) -> tuple[int, int, int]:
        if self.same_layer:
            if target_layer != source_layer:
                raise SpecError(f"target_layer={target_layer}: this sweep ran l* = l only "
                                f"(allowed: target_layer == source_layer)")
            return prompt, self.source_layers.index(source_layer), 0
        return prompt, self.source_layers.index(source_layer), self.target_layers.index(target_layer)

    def _result(self, p: int, i: int, j: int) -> PatchscopeResult:
        flat = (p * len(self.source_layers) + i) * self.columns + j
        target_layer = self.source_layers[i] if self.same_layer else self.target_layers[j]
        return PatchscopeResult(
            scope=self.scope_for(p, self.source_layers[i], target_layer),
            source_position=self.source_positions[p], target_position=int(self.target_positions[p, i, j]),
            top=decode_top(self.tokenizer, self.top_probs[p, i, j].tolist(), self.top_ids[p, i, j].tolist()),
            generation=None if self.generations is None else self.generations[flat],
            logits=None if self.logits is None else self.logits[p, i, j],
            informative=True if self.informative is None else bool(self.informative[p, i, j]),
        )

    def cell(self, prompt: int, source_layer: int, target_layer: int) -> PatchscopeResult:
        return self._result(*self._index(prompt, source_layer, target_layer))

    @property
    def results(self) -> list[PatchscopeResult]:
        """One result per cell, in (prompt, source layer, target layer) order."""
        if self._results is None:
            shape = self.top_ids.shape[:3]
            self._results = [self._result(p, i, j) for p in range(shape[0]) for i in range(shape[1])
                             for j in range(shape[2])]
        return self._results

    def tokens(self) -> list[list[list[str]]]:
        """The top-1 token of every cell, [prompt][source layer][target layer]."""
        ids = self.top_ids[..., 0].tolist()
        return [[[decode_top(self.tokenizer, [0.0], [t])[0].token for t in row] for row in grid] for grid in ids]

    def to_records(self) -> list[dict[str, Any]]:
        return [{
            "prompt": r.scope.source.prompt, "source_layer": r.scope.source.layer,
            "target_layer": r.scope.target.layer, "source_position": r.source_position,
            "token": r.token, "prob": r.prob, "generation": r.generation, "informative": r.informative,
        } for r in self.results]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame.from_records(self.to_records())

    def plot(self, path: str | Path | None = None, prompt: int = 0):
        """Heatmap of source layer x target layer: colour = top-1 probability, text = top-1 token."""
        from .plot import layer_heatmap

        return layer_heatmap(self, prompt=prompt, path=path)

    def to_html(self, path: str | Path | None = None, prompt: int = 0) -> str:
        """The heatmap as one self-contained interactive HTML page (hover a cell for its top-5); written to `path`
        when given. Needs no server and loads nothing."""
        from .export import page, sweep_grid

        html = page(f"Patchscopes sweep: {self.preset}", [("heatmap", sweep_grid(self, prompt))])
        if path is not None:
            from .outputs import write_text

            write_text(path, html)
        return html


@dataclass
class _Cells:
    """What the sweep's cells share across prompts: resolved templates for one prompt, per (l, l*)."""

    templates: list[list[Resolved]]  # [Ls][Lt]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.templates), len(self.templates[0])


def sweep(source_prompts: str | Sequence[str], model: ModelHandle | Any, preset: str = "token-identity",
          source_position: Position = -1, source_layers: Sequence[int] | None = None,
          target_layers: Sequence[int] | str | None = None, progress: bool | None = None, batch_size: int = 32,
          top: int = 10, planned: bool = True, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
          keep_logits: bool = True, distributed: bool | None = None, **options: Any) -> SweepResult:
    """Run `preset` for every prompt x source layer x target layer (all layers by default).

    ``target_layers="same"`` runs l* = l only (one cell per source layer), as token identity does.
    ``batch_size`` source prompts make one unit of work; ``max_batch_tokens`` bounds a patch batch;
    ``keep_logits=False`` keeps only the top-``top`` tokens per cell (a 512-prompt 30 x 30 grid of
    full SmolLM2 logits would be 90 GB). ``distributed`` splits the units over the processes of an
    ``accelerate launch`` (default: whenever more than one process is running).
    """
    prompts = [source_prompts] if isinstance(source_prompts, str) else list(source_prompts)
    if not prompts:
        raise SpecError("source_prompts is empty (allowed: one prompt or more)")
    batch_size = check_int("batch_size", batch_size)
    top = check_int("top", top)
    check_budget(max_batch_tokens)
    models = as_models(model)
    handle = next(iter(models.values()))
    every = list(range(handle.n_layers))
    source_layers = every if source_layers is None else _layer_list("source_layers", source_layers)
    same_layer = isinstance(target_layers, str) and target_layers == "same"
    if isinstance(target_layers, str) and not same_layer:
        raise SpecError(f"target_layers={target_layers!r} is not allowed (allowed: a list of layers, or 'same')")
    target_layers = every if target_layers is None or same_layer else _layer_list("target_layers", target_layers)
    build = get_preset(preset).build
    if preset == "logit-lens":
        options.setdefault("tokenizer", handle.tokenizer)

    def scope_for(p: int, layer: int, target_layer: int) -> Patchscope:
        return build(Source(prompts[p], source_position, layer, handle.name), target_layer=target_layer, **options)

    pairs = [[(l, l)] for l in source_layers] if same_layer else [[(l, t) for t in target_layers]
                                                                   for l in source_layers]
    units = list(chunks(list(range(len(prompts))), batch_size))
    mine = my_units(len(units), distributed)
    parts = {}
    per_prompt = sum(len(row) for row in pairs)
    shared = SharedPrompts()
    with tqdm(total=sum(len(units[u]) for u in mine) * per_prompt, unit="cell", desc="sweep",
              disable=not (progress if progress is not None else len(prompts) * per_prompt > 64)) as bar:
        for u in mine:
            parts[u] = _unit(units[u], scope_for, pairs, models, top, planned, max_batch_tokens, keep_logits,
                             batch_size, shared)
            bar.update(len(units[u]) * per_prompt)
    parts = gather_units(parts, distributed)
    ordered = [parts[u] for u in range(len(units))]
    generations = None if ordered[0]["generations"] is None else [g for part in ordered for g in part["generations"]]
    cat = lambda key: torch.cat([part[key] for part in ordered])  # noqa: E731
    return SweepResult(
        preset=preset, prompts=prompts, source_layers=source_layers, target_layers=target_layers,
        top_probs=cat("top_probs"), top_ids=cat("top_ids"),
        source_positions=[p for part in ordered for p in part["source_positions"]],
        target_positions=cat("target_positions"), scope_for=scope_for, same_layer=same_layer,
        tokenizer=models[scope_for(0, source_layers[0], target_layers[0]).target_model].tokenizer,
        generations=generations, logits=cat("logits") if keep_logits else None, informative=cat("informative"),
    )


def _layer_list(field: str, layers: Any) -> list[int]:
    """A non-empty list of int layers (their range is checked against the model when each scope resolves)."""
    try:
        given = list(layers)
    except TypeError:
        given = None
    checked = [None if isinstance(l, bool) else as_index(l) for l in given or []]
    if not checked or None in checked:
        raise SpecError(f"{field}={layers!r} is not allowed (allowed: a non-empty list of int layer indices)")
    return checked  # type: ignore[return-value]


def _unit(prompts: Sequence[int], scope_for, pairs: list[list[tuple[int, int]]], models, top: int, planned: bool,
          max_batch_tokens: int, keep_logits: bool, batch_size: int, shared: SharedPrompts) -> dict[str, Any]:
    """One unit of source prompts, all its cells: tensors shaped [prompts, Ls, columns, ...] (on the CPU)."""
    cells = _Cells([[resolve(scope_for(prompts[0], l, t), models) for l, t in row] for row in pairs])
    first = cells.templates[0][0]
    if not (planned and _plannable(cells, [scope_for(p, first.scope.source.layer, first.scope.target.layer)
                                           for p in prompts], models)):
        return _unit_by_scopes(prompts, scope_for, pairs, models, top, planned, max_batch_tokens, keep_logits,
                               batch_size)
    return _unit_planned(prompts, scope_for, cells, models, top, max_batch_tokens, keep_logits, batch_size, shared)


def _plannable(cells: _Cells, per_prompt: list[Patchscope], models) -> bool:
    """Whether the cells can run as one planned grid: one target prompt and position for every prompt and
    cell (cells differ in l, l* and f only), no reroute, and a model `stack` supports."""
    first = cells.templates[0][0].scope
    same = lambda scope: (scope.target.prompt, scope.target.position, scope.target_model, scope.max_new_tokens,  # noqa: E731
                          scope.reroute) == (first.target.prompt, first.target.position, first.target_model,
                                             first.max_new_tokens, None)
    return (use_planned(models[first.target_model].model)
            and all(same(cell.scope) for row in cells.templates for cell in row)
            and all(same(scope) for scope in per_prompt))


def _unit_planned(prompts: Sequence[int], scope_for, cells: _Cells, models, top: int, max_batch_tokens: int,
                  keep_logits: bool, batch_size: int, shared: SharedPrompts) -> dict[str, Any]:
    n_source, n_target = cells.shape
    first = cells.templates[0][0]
    source = models[first.scope.source.model]
    target = models[first.scope.target_model]
    # the source: every prompt read once, at every needed source layer
    scopes = [scope_for(p, first.scope.source.layer, first.scope.target.layer) for p in prompts]
    positions = [resolve(s, models).source_position for s in scopes]
    for scope, position in zip(scopes, positions):
        warn_if_sink(position, source.tokenizer, scope.source.prompt)
    sites = [row[0].source_site for row in cells.templates]
    states = collect_states(source, [s.source.prompt for s in scopes], positions, sites, batch_size)  # [n, Ls, d]
    # f per (mapping, source layer): identity cells share one table
    specs: dict[tuple[Any, int], int] = {}
    pair = torch.empty(n_source, n_target, dtype=torch.long)
    for i, row in enumerate(cells.templates):
        for j, cell in enumerate(row):
            pair[i, j] = specs.setdefault((cell.scope.mapping, i), len(specs))
    with torch.no_grad():
        table = torch.stack([
            build_mapping(spec, source.hidden_size, target.hidden_size).to(target.device)(
                states[:, i].to(target.device)).to(target.model.dtype)
            for (spec, i) in specs
        ])  # [pairs, n, d_target]
    # the target: rows (prompt, l, l*) in that order, run by the one planned driver
    per_prompt = n_source * n_target

    def vectors(index: torch.Tensor) -> torch.Tensor:
        return table[pair.view(-1)[index % per_prompt], index // per_prompt]

    n = len(prompts)
    layers = torch.tensor([[c.target_layer for c in row] for row in cells.templates])          # [Ls, Lt]
    after = torch.tensor([[c.target_site.after_final_norm for c in row] for row in cells.templates])
    rows = TargetRows(ids=torch.tensor(token_ids(target.tokenizer, first.scope.target.prompt)),
                      position=first.target_position, layers=layers.view(-1).repeat(n),
                      after_norm=after.view(-1).repeat(n), vectors=vectors, max_new_tokens=first.scope.max_new_tokens)
    out = run_planned(stack_for(target.model), rows, top, max_batch_tokens, target.tokenizer.eos_token_id,
                      keep_logits=keep_logits, shared=shared, pad_token_id=target.tokenizer.pad_token_id)
    shape = (n, n_source, n_target)
    k = out.top_ids.shape[-1]
    return {
        "top_probs": out.top_probs.reshape(*shape, k), "top_ids": out.top_ids.reshape(*shape, k),
        "logits": None if out.logits is None else out.logits.reshape(*shape, -1),
        "generations": None if out.tokens is None else
        target.tokenizer.batch_decode(out.tokens, skip_special_tokens=True),
        "source_positions": positions,
        "target_positions": torch.full(shape, first.target_position, dtype=torch.long),
        "informative": torch.tensor([[c.informative for c in row] for row in cells.templates])
        .expand(n, -1, -1).clone(),
    }


def _unit_by_scopes(prompts: Sequence[int], scope_for, pairs: list[list[tuple[int, int]]], models, top: int,
                    planned: bool, max_batch_tokens: int, keep_logits: bool, batch_size: int) -> dict[str, Any]:
    """Cells whose targets differ by prompt (e.g. the logit lens) or reroute: one spec per cell through `run`."""
    scopes = [scope_for(p, l, t) for p in prompts for row in pairs for l, t in row]
    with warnings.catch_warnings():  # a sweep marks such cells (SweepResult.informative) instead
        warnings.simplefilter("ignore", UninformativeScopeWarning)
        results = run(scopes, models, top=top, batch_size=batch_size, progress=False, planned=planned,
                      max_batch_tokens=max_batch_tokens)
    shape = (len(prompts), len(pairs), len(pairs[0]))
    k = min(top, len(results[0].top))
    return {
        "top_probs": torch.tensor([[t.prob for t in r.top[:k]] for r in results]).reshape(*shape, k),
        "top_ids": torch.tensor([[t.token_id for t in r.top[:k]] for r in results]).reshape(*shape, k),
        "logits": torch.stack([r.logits.float() for r in results]).reshape(*shape, -1) if keep_logits else None,
        "generations": None if results[0].generation is None else [r.generation for r in results],
        "source_positions": [results[q * shape[1] * shape[2]].source_position for q in range(len(prompts))],
        "target_positions": torch.tensor([r.target_position for r in results]).reshape(shape),
        "informative": torch.tensor([r.informative for r in results]).reshape(shape),
    }


__all__ = ["sweep", "SweepResult"]
