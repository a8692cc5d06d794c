"""Sweeps: many source prompts x (source layer, target layer) pairs in one call, returned as a grid.

The sweep is planned as a whole. Source prompts go in units of ``batch_size``; each unit reads every
needed source layer in one pass, then all its (prompt, l, l*) rows are patched by the planned
execution (`execution.planned`): one shared pass of the target prompt, rows packed under ``max_batch_tokens``,
each row computing only from its l* up. Results stay as tensors (top-k ids and probabilities per
cell); `PatchscopeResult` objects are built only when asked for.

Under ``accelerate launch`` the units are split over the processes (`execution.distributed`); every unit is
computed exactly as in one process, so the result is the same bit for bit.

With ``out=folder`` the sweep streams instead: prompts are read a unit at a time from any iterable, each
finished unit is written as a Parquet shard, and a rerun resumes (`sweep_folder`). What a unit shares with
the others (each (l, l*) cell resolved, each f built) is worked out once per sweep, not once per unit.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .engine import run
from ..errors import SpecError, UninformativeScopeWarning, as_index, check_int
from ..plan.batching import chunks
from .distributed import gather_units, my_units, process_slot
from .plain import collect_states
from ..plan.rows import DEFAULT_MAX_BATCH_TOKENS, check_budget
from .planned import SharedPrompts, TargetRows, run_planned, use_planned
from .check import stack_for
from ..spec.mappings import MappingFunction, MappingSpec, build_mapping
from ..models import ModelHandle
from ..spec.positions import token_ids, warn_if_sink
from ..presets import Preset, as_lens, get_preset
from ..resolve import Resolved, as_models, resolve
from ..result import PatchscopeResult, decode_top, token_text
from ..spec.writes import Slots, row_alphas
from ..spec import Patchscope, Position, Source
from ..persist.sweep_folder import FORMAT, MANIFEST, VERSION as FOLDER_VERSION, column_tensor, finished, load_dataset, \
    mark_complete, open_folder, read_manifest, read_units, recorded_unit_prompts, spec_hash, unfinish, unit_prompts, \
    unit_table, write_shard
from ..persist.sweep_records import READOUTS, prompts_sha256


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
    top_tokens: list[str] | None = field(default=None, repr=False)  # top-1 texts, flattened (read from a folder)
    _results: list[PatchscopeResult] | None = field(default=None, repr=False)

    @property
    def columns(self) -> int:
        return 1 if self.same_layer else len(self.target_layers)

    def _index(self, prompt: int, source_layer: int, target_layer: int) -> tuple[int, int, int]:
        if self.same_layer:
            if target_layer != source_layer:
                raise SpecError(f"target_layer={target_layer}: this sweep ran l* = l only "
                                f"(allowed: target_layer == source_layer)")
            return prompt, _position_of("source_layer", source_layer, self.source_layers), 0
        return (prompt, _position_of("source_layer", source_layer, self.source_layers),
                _position_of("target_layer", target_layer, self.target_layers))

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

    def _top_texts(self) -> list[str]:
        """The top-1 token text of every cell, flattened in (prompt, l, l*) order."""
        if self.top_tokens is None:
            if self.tokenizer is None:
                raise SpecError("this sweep was loaded without its model (allowed: SweepResult.load(folder, "
                                "model=...) to decode tokens)")
            self.top_tokens = top_texts(self.tokenizer, self.top_ids[..., 0])
        return self.top_tokens

    def tokens(self) -> list[list[list[str]]]:
        """The top-1 token of every cell, [prompt][source layer][target layer]."""
        texts = iter(self._top_texts())
        shape = self.top_ids.shape[:3]
        return [[[next(texts) for _ in range(shape[2])] for _ in range(shape[1])] for _ in range(shape[0])]

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per cell, in (prompt, l, l*) order, built column-wise from the tensors."""
        n, n_source, n_target = self.top_ids.shape[:3]
        targets = [[l] for l in self.source_layers] if self.same_layer else \
            [self.target_layers] * n_source
        texts, probs = self._top_texts(), self.top_probs[..., 0].reshape(-1).tolist()
        informative = [True] * len(texts) if self.informative is None else self.informative.reshape(-1).tolist()
        generations = self.generations or [None] * len(texts)
        cells = ((p, l, t) for p in range(n) for i, l in enumerate(self.source_layers) for t in targets[i])
        return [{"prompt": self.prompts[p], "source_layer": l, "target_layer": t,
                 "source_position": self.source_positions[p], "token": texts[c], "prob": probs[c],
                 "generation": generations[c], "informative": informative[c]}
                for c, (p, l, t) in enumerate(cells)]

    @classmethod
    def load(cls, folder: str | os.PathLike, model: ModelHandle | Any = None, partial: bool = False,
             lazy: bool = False) -> "SweepResult | Any":
        """Read a sweep folder written by ``sweep(..., out=folder)`` back into memory.

        ``model`` (the handle the sweep ran on) makes its cells' specs and tokenizer available
        (``cell``, ``results``, ``plot``); without it the tensors, prompts, top-1 tokens and generations load.
        ``partial=True`` reads an unfinished sweep's finished units; ``lazy=True`` returns every cell as a
        `datasets.Dataset` memory-mapped from the shards instead. A model other than the sweep's is refused (its
        tokenizer would decode the cells' token ids, and its name label them), and so is a folder whose records
        do not check (`sweep_records`).
        """
        from ..core.files import expand

        path = expand(folder)
        manifest = read_manifest(path)
        handle = None if model is None else as_models(model)
        if handle is not None:
            _check_models(path, manifest, handle)
        if lazy:
            return load_dataset(path, partial)
        tables = read_units(path, partial)
        if not tables:
            raise SpecError(f"{path} holds no finished unit yet (allowed: a folder with at least one shard)")
        same = manifest["target_layers"] == "same"
        source_layers = list(manifest["source_layers"])
        target_layers = source_layers if same else list(manifest["target_layers"])
        columns = 1 if same else len(target_layers)
        per_prompt = len(source_layers) * columns
        prompts = [p for t in tables for p in t.column("prompt").to_pylist()[::per_prompt]]
        shape = (len(prompts), len(source_layers), columns)
        top_ids = column_tensor(tables, "top_ids", torch.long)
        generations = [g for t in tables for g in t.column("generation").to_pylist()]
        logits = column_tensor(tables, "logits", torch.float32) if "logits" in tables[0].column_names else None
        return cls(
            preset=manifest["preset"], prompts=prompts, source_layers=source_layers, target_layers=target_layers,
            top_probs=column_tensor(tables, "top_probs", torch.float32).reshape(*shape, -1),
            top_ids=top_ids.reshape(*shape, -1),
            source_positions=[int(x) for t in tables for x in t.column("source_position").to_pylist()[::per_prompt]],
            target_positions=column_tensor(tables, "target_position", torch.long).reshape(shape),
            scope_for=_scopes_from(manifest, prompts, handle), same_layer=same,
            tokenizer=None if handle is None else next(iter(handle.values())).tokenizer,
            generations=None if all(g is None for g in generations) else generations,
            logits=None if logits is None else logits.reshape(*shape, -1),
            informative=column_tensor(tables, "informative", torch.bool).reshape(shape),
            top_tokens=[x for t in tables for x in t.column("token").to_pylist()],
        )

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame.from_records(self.to_records())

    def plot(self, path: str | Path | None = None, prompt: int = 0):
        """Heatmap of source layer x target layer: colour = top-1 probability, text = top-1 token."""
        from ..export.figures import layer_heatmap

        return layer_heatmap(self, prompt=prompt, path=path)

    def to_html(self, path: str | Path | None = None, prompt: int = 0) -> str:
        """The heatmap as one self-contained interactive HTML page (hover a cell for its top-5); written to `path`
        when given. Needs no server and loads nothing."""
        from ..export import page, sweep_grid

        html = page(f"Patchscopes sweep: {self.preset}", [("heatmap", sweep_grid(self, prompt))])
        if path is not None:
            from ..core.outputs import write_text

            write_text(path, html)
        return html


@dataclass
class SweepFolder:
    """What ``sweep(..., out=folder)`` returns: the folder, its manifest, and which units this call computed."""

    path: Path
    manifest: dict[str, Any]
    computed: list[int] = field(default_factory=list)   # units this process computed in this call
    skipped: list[int] = field(default_factory=list)    # units this process found finished

    def load(self, model: Any = None):
        """The whole sweep as an in-memory `SweepResult` (see `SweepResult.load`)."""
        return SweepResult.load(self.path, model)

    def dataset(self):
        """Every cell as a `datasets.Dataset`, memory-mapped from the shards (not read into memory)."""
        return load_dataset(self.path)


def top_texts(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    """Token texts of `ids` (any shape, flattened), each distinct id decoded once."""
    flat = ids.reshape(-1).tolist()
    text = {i: token_text(tokenizer, i) for i in set(flat)}
    return [text[i] for i in flat]


def _scopes_from(manifest: dict[str, Any], prompts: list[str], models: dict[str, ModelHandle] | None):
    """The cells' specs of a loaded sweep, rebuilt from its manifest's preset and options."""
    def scope_for(p: int, layer: int, target_layer: int) -> Patchscope:
        if models is None:
            raise SpecError("this sweep was loaded without its model (allowed: SweepResult.load(folder, model=...) "
                            "to rebuild its cells' specs)")
        handle = next(iter(models.values()))
        options = dict(manifest["options"])
        if isinstance(options.get("mapping"), dict):
            if options["mapping"]["weights"]:
                raise SpecError("this sweep's mapping has learned weights, which its folder records by hash only "
                                "(allowed: the tensors, tokens and generations of SweepResult.load; rebuild a cell's "
                                "spec with the mapping itself)")
            options["mapping"] = MappingSpec(options["mapping"]["mapping"]["name"],
                                             options["mapping"]["mapping"]["args"])
        make = _cell_maker(get_preset(manifest["preset"]), handle, manifest["source_position"], options)
        return make(prompts[p], layer, target_layer)
    return scope_for


def _cell_maker(preset: Preset, handle: ModelHandle, source_position: Position,
                options: dict[str, Any]) -> Callable[[str, int, int], Patchscope]:
    """(source prompt, l, l*) -> the cell's spec, as the preset builds it (a fixed l* from the preset itself)."""
    if preset.needs_tokenizer:
        options.setdefault("tokenizer", handle.tokenizer)

    def make(prompt: str, layer: int, target_layer: int) -> Patchscope:
        return preset.build(Source(prompt, source_position, layer, handle.name), target_layer=target_layer,
                            n_layers=handle.n_layers, **options)
    return make


@dataclass
class _Cells:
    """What the sweep's cells share across prompts: resolved templates for one prompt, per (l, l*)."""

    templates: list[list[Resolved]]  # [Ls][Lt]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.templates), len(self.templates[0])


BATCH_SIZE = 32  # source prompts per unit of an in-memory sweep, and rows per forward pass in a unit, by default


def sweep(source_prompts: str | Iterable[str], model: ModelHandle | Any, preset: str = "token-identity",
          source_position: Position = -1, source_layers: Sequence[int] | None = None,
          target_layers: Sequence[int] | str | None = None, progress: bool | None = None,
          batch_size: int | None = None, top: int = 10, planned: bool = True,
          max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, keep_logits: bool = False, distributed: bool | None = None,
          out: str | os.PathLike | None = None, readout: str = "top", **options: Any) -> "SweepResult | SweepFolder":
    """Run `preset` for every prompt x source layer x target layer (all layers by default).

    ``target_layers="same"`` runs l* = l only (one cell per source layer), as token identity does. A preset that
    fixes l* (``logit-lens``, ``jacobian-lens``: the last layer; `Preset.target_layer`) sweeps only there: one
    column, l* = n_layers - 1 (given as the default, ``[-1]`` or ``[n_layers - 1]``), and any other ``target_layers``
    is refused.
    Each cell generates what the preset's own Patchscope generates (its ``max_new_tokens``: token-identity 4,
    logit-lens 0, future-lens 3, attribute 20, ...), as `build` and `run` do; ``max_new_tokens=0`` reads the
    next token only, which is faster.
    ``batch_size`` source prompts make one unit of work: by default 32 in memory, and with ``out=`` as many as
    fit 256 cells (`sweep_folder.UNIT_CELLS`, at least one prompt, at most 32): one prompt a unit for SmolLM2's
    30 x 30 grid, 8 at l* = l. Left to its default, a folder that holds this same sweep with other units (one
    written before that rule, 32 prompts a unit) keeps its own, so the same call resumes it. Inside a unit the
    forward passes take 32 rows at a time (``batch_size`` where given), however few prompts the unit holds;
    ``max_batch_tokens`` bounds a patch batch.
    ``readout``: ``"top"`` keeps the top-``top`` tokens per cell (and generations when generating);
    ``"logits"`` (or ``keep_logits=True``) also keeps the full-vocabulary logits, which a 512-prompt 30 x 30
    grid of SmolLM2 would need 90 GB for; ``"generations"`` keeps the generations and the top-1 token only.
    ``distributed`` splits the units over the processes of an ``accelerate launch`` (default: whenever more
    than one process is running).

    ``out=folder`` streams: `source_prompts` may be any iterable (a ``datasets`` column, a generator), read
    one unit at a time; each finished unit is written to the folder as a Parquet shard, a rerun skips the
    finished ones, and a `SweepFolder` is returned (``.load()``, ``.dataset()``). See `sweep_folder`.
    """
    readout = _readout(readout, keep_logits)
    top = 1 if readout == "generations" else check_int("top", top)
    check_budget(max_batch_tokens)
    models = as_models(model)
    handle = next(iter(models.values()))
    every = list(range(handle.n_layers))
    chosen = get_preset(preset)
    target_layers = chosen.target_layers(target_layers, handle.n_layers)  # a preset that fixes l* sweeps only there
    source_layers = every if source_layers is None else _layer_list("source_layers", source_layers)
    same_layer = isinstance(target_layers, str) and target_layers == "same"
    if isinstance(target_layers, str) and not same_layer:
        raise SpecError(f"target_layers={target_layers!r} is not allowed (allowed: a list of layers, or 'same')")
    target_layers = every if target_layers is None or same_layer else _layer_list("target_layers", target_layers)
    if chosen.needs_lens:
        options["lens"] = as_lens(options.get("lens"))  # read once, not once per cell
    make = _cell_maker(chosen, handle, source_position, options)
    pairs = [[(l, l)] for l in source_layers] if same_layer else [[(l, t) for t in target_layers]
                                                                   for l in source_layers]
    per_unit = _unit_size(batch_size, sum(map(len, pairs)), streamed=out is not None)
    grid = _Grid(make, pairs, models, top, planned, max_batch_tokens, readout == "logits", per_unit,
                 BATCH_SIZE if batch_size is None else per_unit)
    shape = _Shape(preset, source_layers, target_layers, same_layer)
    if out is not None:
        manifest = _manifest(grid, shape, source_position, readout, options)
        kept = recorded_unit_prompts(out, manifest) if batch_size is None else None
        if kept is not None and kept != per_unit:  # the folder's own units (32 before UNIT_CELLS): the call resumes
            grid.prompts_per_unit = kept
            manifest = _manifest(grid, shape, source_position, readout, options)
        return _sweep_to_folder(source_prompts, grid, shape, out, distributed, progress, manifest)
    prompts = _prompt_list(source_prompts)
    units = list(chunks(prompts, per_unit))
    mine = my_units(len(units), distributed)
    parts = {}
    per_prompt = grid.cells_per_prompt
    with tqdm(total=sum(len(units[u]) for u in mine) * per_prompt, unit="cell", desc="sweep",
              disable=not (progress if progress is not None else len(prompts) * per_prompt > 64)) as bar:
        for u in mine:
            parts[u] = grid.unit(units[u])
            bar.update(len(units[u]) * per_prompt)
    parts = gather_units(parts, distributed)
    return _assemble(shape, prompts, [parts[u] for u in range(len(units))], grid.scope_for(prompts),
                     models[grid.make(prompts[0], source_layers[0], target_layers[0]).target_model].tokenizer)


def _unit_size(batch_size: int | None, cells_per_prompt: int, streamed: bool) -> int:
    """Source prompts per unit: `batch_size` where given; by default `BATCH_SIZE` in memory, and for a streamed
    sweep as many as fit `UNIT_CELLS` cells (`sweep_folder.unit_prompts`), so that a kill loses little."""
    if batch_size is not None:
        return check_int("batch_size", batch_size)
    return unit_prompts(cells_per_prompt, BATCH_SIZE) if streamed else BATCH_SIZE


@dataclass(frozen=True)
class _Shape:
    """The grid's axes, shared by every unit."""

    preset: str
    source_layers: list[int]
    target_layers: list[int]
    same_layer: bool


def _readout(readout: str, keep_logits: bool) -> str:
    if readout not in READOUTS:
        raise SpecError(f"readout={readout!r} is not known (allowed: {', '.join(READOUTS)})")
    if keep_logits and readout not in ("top", "logits"):
        raise SpecError(f"keep_logits=True and readout={readout!r} disagree (allowed: readout='logits', which is "
                        "what keep_logits=True means)")
    return "logits" if keep_logits else readout


def _prompt_list(source_prompts: Any) -> list[str]:
    prompts = [source_prompts] if isinstance(source_prompts, str) else list(source_prompts)
    if not prompts:
        raise SpecError("source_prompts is empty (allowed: one prompt or more)")
    return prompts


def _prompt_units(source_prompts: Any, batch_size: int) -> Iterator[list[str]]:
    """The input in units of `batch_size` prompts, read lazily (a list, a generator, a `datasets` column)."""
    if isinstance(source_prompts, str):
        yield [source_prompts]
        return
    try:
        iterator = iter(source_prompts)
    except TypeError:
        raise SpecError(f"source_prompts of type {type(source_prompts).__name__} is not allowed (allowed: a "
                        "prompt, or an iterable of prompts such as a list or a datasets column)") from None
    empty = True
    while True:
        unit = list(itertools.islice(iterator, batch_size))
        if not unit:
            break
        empty = False
        yield unit
    if empty:
        raise SpecError("source_prompts is empty (allowed: one prompt or more)")


@dataclass
class _Grid:
    """How one unit of source prompts becomes its cells; what every unit shares is worked out once."""

    make: Callable[[str, int, int], Patchscope]   # (source prompt, l, l*) -> the cell's spec
    pairs: list[list[tuple[int, int]]]
    models: dict[str, ModelHandle]
    top: int
    planned: bool
    max_batch_tokens: int
    keep_logits: bool
    prompts_per_unit: int      # source prompts per unit (a streamed unit is what a kill can lose)
    forward_batch: int         # rows per forward pass inside a unit: the source read, and run's batches
    shared: SharedPrompts = field(default_factory=SharedPrompts)
    _cells: _Cells | None = None
    _mappings: dict[Any, Any] = field(default_factory=dict)

    @property
    def cells_per_prompt(self) -> int:
        return sum(len(row) for row in self.pairs)

    def cells(self, prompt: str) -> _Cells:
        """Every (l, l*) cell resolved once per sweep, on the first prompt: they differ across prompts only in
        the source prompt, which each unit resolves per prompt (`_unit_planned`)."""
        if self._cells is None:
            self._cells = _Cells([[resolve(self.make(prompt, l, t), self.models) for l, t in row]
                                  for row in self.pairs])
        return self._cells

    def mapping(self, spec: Any, source: ModelHandle, target: ModelHandle):
        """f, built once per (mapping, source model, target model) and placed on the target's device."""
        key = (spec, source.name, target.name)
        if key not in self._mappings:
            self._mappings[key] = build_mapping(spec, source.hidden_size, target.hidden_size).to(target.device)
        return self._mappings[key]

    def scope_for(self, prompts: list[str]) -> Callable[[int, int, int], Patchscope]:
        return lambda p, layer, target_layer: self.make(prompts[p], layer, target_layer)

    def unit(self, prompts: list[str]) -> dict[str, Any]:
        """One unit of source prompts, all its cells: tensors shaped [prompts, Ls, columns, ...] (on the CPU)."""
        cells = self.cells(prompts[0])
        first = cells.templates[0][0]
        if not (self.planned and _plannable(cells, [self.make(p, first.scope.source.layer, first.scope.target.layer)
                                                    for p in prompts], self.models)):
            return _unit_by_scopes(prompts, self)
        return _unit_planned(prompts, self, cells)


def _assemble(shape: _Shape, prompts: list[str], ordered: list[dict[str, Any]], scope_for, tokenizer,
              top_tokens: list[str] | None = None) -> "SweepResult":
    generations = None if ordered[0]["generations"] is None else [g for part in ordered for g in part["generations"]]
    cat = lambda key: torch.cat([part[key] for part in ordered])  # noqa: E731
    return SweepResult(
        preset=shape.preset, prompts=prompts, source_layers=shape.source_layers, target_layers=shape.target_layers,
        top_probs=cat("top_probs"), top_ids=cat("top_ids"),
        source_positions=[p for part in ordered for p in part["source_positions"]],
        target_positions=cat("target_positions"), scope_for=scope_for, same_layer=shape.same_layer,
        tokenizer=tokenizer, generations=generations,
        logits=cat("logits") if ordered[0].get("logits") is not None else None, informative=cat("informative"),
        top_tokens=top_tokens,
    )


# ---- out=folder: streamed, one shard per unit, resumable ------------------------------------------------------
def _manifest(grid: _Grid, shape: _Shape, source_position: Position, readout: str,
              options: dict[str, Any]) -> dict[str, Any]:
    """What the sweep is, as the folder records it: the preset and its options (a mapping with its weights' hash)
    make every cell's spec, so their hash tells two sweeps apart."""
    recorded = {k: _recordable(k, v) for k, v in sorted(options.items()) if k != "tokenizer"}
    description = {
        "preset": shape.preset, "source_position": source_position, "source_layers": shape.source_layers,
        "target_layers": "same" if shape.same_layer else shape.target_layers, "readout": readout, "top": grid.top,
        "batch_size": grid.prompts_per_unit, "planned": grid.planned, "max_batch_tokens": grid.max_batch_tokens,
        "options": recorded, "models": {name: _identity(h) for name, h in sorted(grid.models.items())},
    }
    return {"format": FORMAT, "version": FOLDER_VERSION, "spec_hash": spec_hash(description), **description}


def _recordable(name: str, value: Any) -> Any:
    """An option as JSON for the manifest: plain values as they are, a mapping by its spec and weights' hash."""
    if isinstance(value, (MappingSpec, MappingFunction, str)) and name == "mapping":
        spec = MappingSpec.coerce(value)
        digest = hashlib.sha256()
        for key in sorted(spec.weights):
            digest.update(key.encode())
            digest.update(spec.weights[key].float().numpy().tobytes())
        return {"mapping": spec.to_dict(), "weights": sorted(spec.weights), "weights_sha256": digest.hexdigest()}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise SpecError(f"option {name}={type(value).__name__} cannot be recorded in a sweep folder's manifest "
                        "(allowed with out=: JSON values, and a mapping)") from None
    return value


def _identity(handle: ModelHandle) -> dict[str, Any]:
    """What the folder records of a model: where it came from, the hash of the weights it runs with (a local
    folder's whose files may change, a `wrap_model` model's, an adapter's; not only a GGUF's) and of its tokenizer
    (another one, with the same weights, puts the slots elsewhere and decodes the ids otherwise)."""
    return {"name": handle.name, "class": type(handle.model).__name__, "origin": dict(handle.origin),
            "dtype": str(handle.dtype).replace("torch.", ""), "n_layers": handle.n_layers,
            "hidden_size": handle.hidden_size, "weights_sha256": handle.weights_sha256(),
            "tokenizer_sha256": tokenizer_sha256(handle.tokenizer)}


def tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what a tokenizer does: a fast tokenizer's whole serialized pipeline (normalizer, pre-tokenizer,
    model, merges), else its vocabulary; with its class and special tokens either way."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    head = json.dumps([type(tokenizer).__name__, tokenizer.special_tokens_map], sort_keys=True, default=str)
    return hashlib.sha256(f"{head}\n{body}".encode()).hexdigest()


def _check_models(folder: Path, manifest: dict[str, Any], models: dict[str, ModelHandle]) -> None:
    """Refuse to load a sweep with models other than those it ran on, by their identities as its manifest holds
    them: another tokenizer would decode its cells' token ids, and another name label them."""
    given = {name: json.loads(json.dumps(_identity(h), default=str)) for name, h in models.items()}
    recorded = manifest["models"]
    if given != recorded:
        both = [(given[n], recorded[n]) for n in given.keys() & recorded.keys()]
        differs = sorted({k for a, b in both for k in a.keys() | b.keys() if a.get(k) != b.get(k)}) or ["name"]
        raise SpecError(f"model={', '.join(given)} is not the model this sweep ran on ({', '.join(recorded)}, as "
                        f"{folder / MANIFEST} records it; they differ in {', '.join(differs)}) (allowed: the sweep's "
                        "own model, or none)")


def _sweep_to_folder(source_prompts: Any, grid: _Grid, shape: _Shape, out: str | os.PathLike,
                     distributed: bool | None, progress: bool | None, manifest: dict[str, Any]) -> SweepFolder:
    """Each unit this process owns (round robin under accelerate) computed unless its shard is already there."""
    rank, size, barrier, is_main = process_slot(distributed)
    folder = open_folder(out, manifest) if is_main else None
    barrier()  # the main process creates the folder and its manifest before the others check it
    folder = folder or open_folder(out, manifest, clean=False)
    done = SweepFolder(folder, manifest)
    total = getattr(source_prompts, "__len__", None)
    per_prompt = grid.cells_per_prompt
    count, units = 0, []  # units: every unit's prompts' hash, this process's or not, for the completion record
    with tqdm(total=None if total is None else len(source_prompts) * per_prompt, unit="cell", desc="sweep",
              disable=not (progress if progress is not None else True)) as bar:
        for u, prompts in enumerate(_prompt_units(source_prompts, grid.prompts_per_unit)):
            first, count = count, count + len(prompts)
            units.append(prompts_sha256(prompts))
            if u % size != rank:
                continue
            if finished(folder, u, prompts, manifest):
                done.skipped.append(u)
            else:
                if not done.computed:
                    unfinish(folder)  # the old completion record no longer holds once a shard changes
                part = grid.unit(prompts)
                tokenizer = grid.models[grid.cells(prompts[0]).templates[0][0].scope.target_model].tokenizer
                table = unit_table(u, first, prompts, part, shape.source_layers, shape.target_layers,
                                   shape.same_layer, top_texts(tokenizer, part["top_ids"][..., 0]))
                write_shard(folder, u, table, manifest["spec_hash"])
                done.computed.append(u)
            bar.update(len(prompts) * per_prompt)
    barrier()
    if is_main:
        mark_complete(folder, units, count, manifest["spec_hash"])
    barrier()
    return done


def _position_of(field: str, layer: int, layers: list[int]) -> int:
    """Where `layer` is in a sweep's layers, as it was given (-1 is not 29), else one line naming them."""
    if layer not in layers:
        raise SpecError(f"{field}={layer!r} is not among this sweep's layers (allowed: {', '.join(map(str, layers))})")
    return layers.index(layer)


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


def _plannable(cells: _Cells, per_prompt: list[Patchscope], models) -> bool:
    """Whether the cells can run as one planned grid: one target prompt and position for every prompt and
    cell (cells differ in l, l* and f only), no reroute, and a model `stack` supports."""
    first = cells.templates[0][0].scope
    same = lambda scope: (scope.target.prompt, scope.target.position, scope.target.write, scope.target.alpha,  # noqa: E731
                          scope.target_model, scope.max_new_tokens, scope.reroute) == (
        first.target.prompt, first.target.position, first.target.write, first.target.alpha, first.target_model,
        first.max_new_tokens, None)
    return (use_planned(models[first.target_model].model)
            and all(same(cell.scope) for row in cells.templates for cell in row)
            and all(same(scope) for scope in per_prompt))


def _unit_planned(prompts: list[str], grid: _Grid, cells: _Cells) -> dict[str, Any]:
    n_source, n_target = cells.shape
    first = cells.templates[0][0]
    models = grid.models
    source = models[first.scope.source.model]
    target = models[first.scope.target_model]
    # the source: every prompt resolved once (its position i) and read once, at every needed source layer
    scopes = [grid.make(p, first.scope.source.layer, first.scope.target.layer) for p in prompts]
    positions = [resolve(s, models).source_position for s in scopes]
    for scope, position in zip(scopes, positions):
        warn_if_sink(position, source.tokenizer, scope.source.prompt)
    sites = [row[0].source_site for row in cells.templates]
    states = collect_states(source, prompts, positions, sites, grid.forward_batch)  # [n, Ls, d]
    # f per (mapping, source layer): identity cells share one table
    specs: dict[tuple[Any, int], int] = {}
    pair = torch.empty(n_source, n_target, dtype=torch.long)
    for i, row in enumerate(cells.templates):
        for j, cell in enumerate(row):
            pair[i, j] = specs.setdefault((cell.scope.mapping, i), len(specs))
    with torch.no_grad():
        table = torch.stack([
            grid.mapping(spec, source, target)(states[:, i].to(target.device)).to(target.dtype)
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
                      after_norm=after.view(-1).repeat(n), vectors=vectors, max_new_tokens=first.scope.max_new_tokens,
                      slots=Slots(tuple(slot - first.target_position for slot in first.slots), first.scope.target.write),
                      alphas=row_alphas([first.scope.target.alpha] * (layers.numel() * n)))
    out = run_planned(stack_for(target.model), rows, grid.top, grid.max_batch_tokens, target.tokenizer.eos_token_id,
                      keep_logits=grid.keep_logits, shared=grid.shared, pad_token_id=target.tokenizer.pad_token_id)
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


def _unit_by_scopes(prompts: list[str], grid: _Grid) -> dict[str, Any]:
    """Cells whose targets differ by prompt (e.g. the logit lens) or reroute: one spec per cell through `run`."""
    pairs = grid.pairs
    scopes = [grid.make(p, l, t) for p in prompts for row in pairs for l, t in row]
    with warnings.catch_warnings():  # a sweep marks such cells (SweepResult.informative) instead
        warnings.simplefilter("ignore", UninformativeScopeWarning)
        results = run(scopes, grid.models, top=grid.top, batch_size=grid.forward_batch, progress=False,
                      planned=grid.planned, max_batch_tokens=grid.max_batch_tokens)
    shape = (len(prompts), len(pairs), len(pairs[0]))
    k = min(grid.top, len(results[0].top))
    return {
        "top_probs": torch.tensor([[t.prob for t in r.top[:k]] for r in results]).reshape(*shape, k),
        "top_ids": torch.tensor([[t.token_id for t in r.top[:k]] for r in results]).reshape(*shape, k),
        "logits": torch.stack([r.logits.float() for r in results]).reshape(*shape, -1) if grid.keep_logits else None,
        "generations": None if results[0].generation is None else [r.generation for r in results],
        "source_positions": [results[q * shape[1] * shape[2]].source_position for q in range(len(prompts))],
        "target_positions": torch.tensor([r.target_position for r in results]).reshape(shape),
        "informative": torch.tensor([r.informative for r in results]).reshape(shape),
    }


__all__ = ["sweep", "SweepResult", "SweepFolder", "READOUTS"]
