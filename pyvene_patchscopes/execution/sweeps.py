"""Sweeps: many source prompts x (source layer, target layer) pairs in one call, returned as a grid (`sweep`), and a
sweep folder read back (`load_sweep`).

The sweep is planned as a whole (`plan.grid`). Source prompts go in units of ``batch_size``; each unit reads every
needed source layer in one pass, then all its (prompt, l, l*) rows are patched by the planned
execution (`execution.sweep_units`, `execution.planned`): one shared pass of the target prompt, rows packed under
``max_batch_tokens``, each row computing only from its l* up. Results stay as tensors (top-k ids and probabilities
per cell, `result.sweep.SweepResult`); `PatchscopeResult` objects are built only when asked for.

Under ``accelerate launch`` the units are split over the processes (`execution.distributed`); every unit is
computed exactly as in one process, so the result is the same bit for bit.

With ``out=folder`` the sweep streams instead: prompts are read a unit at a time from any iterable, each
finished unit is written as a Parquet shard, and a rerun resumes (`persist.sweep_folder`). What a unit shares with
the others (each (l, l*) cell resolved, each f built) is worked out once per sweep, not once per unit.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence, overload

import torch
from tqdm.auto import tqdm

from ..core.files import expand
from ..errors import SpecError, check_int
from ..models import ModelHandle
from ..persist.sweep_folder import (
    finished,
    mark_complete,
    open_folder,
    recorded_unit_prompts,
    unfinish,
    unit_table,
    write_shard,
)
from ..persist.sweep_reader import (
    column_tensor,
    load_dataset,
    read_manifest,
    read_units,
)
from ..persist.sweep_records import READOUTS, prompts_sha256
from ..plan.batching import chunks
from ..plan.grid import (
    BATCH_SIZE,
    Grid,
    Shape,
    cell_maker,
    check_readout,
    layer_list,
    prompt_list,
    prompt_units,
    unit_size,
)
from ..plan.rows import DEFAULT_MAX_BATCH_TOKENS, check_budget
from ..presets import as_lens, get_preset
from ..resolve import as_models
from ..result.sweep import SweepFolder, SweepResult, top_texts
from ..spec import Patchscope, Position
from ..spec.mappings import MappingSpec
from ..spec.verify import VerifySettings
from .distributed import gather_units, my_units, process_slot
from .planned import SharedPrompts
from .sweep_manifest import check_models, folder_manifest
from .sweep_units import run_unit
from .sweep_verify import check_cell, check_verifiable, recorded_checks, recorded_settings, verify_settings
from .verify import verify as verify_cells


def _scopes_from(manifest: dict[str, Any], prompts: list[str], models: dict[str, ModelHandle] | None):
    """The cells' specs of a loaded sweep, rebuilt from its manifest's preset and options."""

    def scope_for(p: int, layer: int, target_layer: int) -> Patchscope:
        if models is None:
            raise SpecError(
                "this sweep was loaded without its model (allowed: load_sweep(folder, model=...) to "
                "rebuild its cells' specs)"
            )
        handle = next(iter(models.values()))
        options = dict(manifest["options"])
        if isinstance(options.get("mapping"), dict):
            if options["mapping"]["weights"]:
                raise SpecError(
                    "this sweep's mapping has learned weights, which its folder records by hash only "
                    "(allowed: the tensors, tokens and generations of load_sweep; rebuild a cell's "
                    "spec with the mapping itself)"
                )
            options["mapping"] = MappingSpec(
                options["mapping"]["mapping"]["name"], options["mapping"]["mapping"]["args"]
            )
        make = cell_maker(
            get_preset(manifest["preset"]), handle, manifest["source_position"], options, recorded_settings(manifest)
        )
        return make(prompts[p], layer, target_layer)

    return scope_for


@overload
def sweep(
    source_prompts: str | Iterable[str],
    model: ModelHandle | Any,
    preset: str = ...,
    source_position: Position = ...,
    source_layers: Sequence[int] | None = ...,
    target_layers: Sequence[int] | str | None = ...,
    progress: bool | None = ...,
    batch_size: int | None = ...,
    top: int = ...,
    planned: bool = ...,
    max_batch_tokens: int = ...,
    keep_logits: bool = ...,
    distributed: bool | None = ...,
    out: None = ...,
    readout: str = ...,
    verify: bool | VerifySettings = ...,
    **options: Any,
) -> SweepResult: ...


@overload  # out=folder streams into the folder
def sweep(
    source_prompts: str | Iterable[str],
    model: ModelHandle | Any,
    preset: str = ...,
    source_position: Position = ...,
    source_layers: Sequence[int] | None = ...,
    target_layers: Sequence[int] | str | None = ...,
    progress: bool | None = ...,
    batch_size: int | None = ...,
    top: int = ...,
    planned: bool = ...,
    max_batch_tokens: int = ...,
    keep_logits: bool = ...,
    distributed: bool | None = ...,
    *,
    out: str | os.PathLike,
    readout: str = ...,
    verify: bool | VerifySettings = ...,
    **options: Any,
) -> SweepFolder: ...


@overload
def sweep(
    source_prompts: str | Iterable[str],
    model: ModelHandle | Any,
    preset: str = ...,
    source_position: Position = ...,
    source_layers: Sequence[int] | None = ...,
    target_layers: Sequence[int] | str | None = ...,
    progress: bool | None = ...,
    batch_size: int | None = ...,
    top: int = ...,
    planned: bool = ...,
    max_batch_tokens: int = ...,
    keep_logits: bool = ...,
    distributed: bool | None = ...,
    out: str | os.PathLike | None = ...,
    readout: str = ...,
    verify: bool | VerifySettings = ...,
    **options: Any,
) -> SweepResult | SweepFolder: ...


def sweep(
    source_prompts: str | Iterable[str],
    model: ModelHandle | Any,
    preset: str = "token-identity",
    source_position: Position = -1,
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | str | None = None,
    progress: bool | None = None,
    batch_size: int | None = None,
    top: int = 10,
    planned: bool = True,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    keep_logits: bool = False,
    distributed: bool | None = None,
    out: str | os.PathLike | None = None,
    readout: str = "top",
    verify: bool | VerifySettings = False,
    **options: Any,
) -> SweepResult | SweepFolder:
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
    ``verify=True`` (or a `VerifySettings`; True is `VerifySettings()`) checks every cell's reading with `verify` on
    the source model, one unit at a time, in the process that computed it: the result's ``verifications`` (cell
    order) and its records, or the shards' `VERIFY_COLUMNS`; the settings are each cell's ``Patchscope.verify`` and
    part of a folder's manifest (`execution.sweep_verify`).

    ``out=folder`` streams: `source_prompts` may be any iterable (a ``datasets`` column, a generator), read
    one unit at a time; each finished unit is written to the folder as a Parquet shard, a rerun skips the
    finished ones, and a `SweepFolder` is returned: read it with `load_sweep` (``lazy=True``: as a
    ``datasets.Dataset``). See `persist.sweep_folder`.
    """
    settings = verify_settings(verify)
    readout = check_readout(readout, keep_logits)
    top = 1 if readout == "generations" else check_int("top", top)
    check_budget(max_batch_tokens)
    models = as_models(model)
    handle = next(iter(models.values()))
    if settings is not None:
        check_verifiable(settings, handle)
    every = list(range(handle.n_layers))
    chosen = get_preset(preset)
    target_layers = chosen.target_layers(target_layers, handle.n_layers)  # a preset that fixes l* sweeps only there
    source_layers = every if source_layers is None else layer_list("source_layers", source_layers)
    same_layer = isinstance(target_layers, str) and target_layers == "same"
    if isinstance(target_layers, str) and not same_layer:
        raise SpecError(f"target_layers={target_layers!r} is not allowed (allowed: a list of layers, or 'same')")
    target_layers = every if target_layers is None or same_layer else layer_list("target_layers", target_layers)
    if chosen.needs_lens:
        options["lens"] = as_lens(options.get("lens"))  # read once, not once per cell
    make = cell_maker(chosen, handle, source_position, options, settings)
    pairs = (
        [[(l, l)] for l in source_layers] if same_layer else [[(l, t) for t in target_layers] for l in source_layers]
    )
    per_unit = unit_size(batch_size, sum(map(len, pairs)), streamed=out is not None)
    grid = Grid(
        make,
        pairs,
        models,
        top,
        planned,
        max_batch_tokens,
        readout == "logits",
        per_unit,
        BATCH_SIZE if batch_size is None else per_unit,
        SharedPrompts(),
    )
    shape = Shape(preset, source_layers, target_layers, same_layer)
    if out is not None:
        manifest = folder_manifest(grid, shape, source_position, readout, options, settings)
        kept = recorded_unit_prompts(out, manifest) if batch_size is None else None
        if kept is not None and kept != per_unit:  # the folder's own units (32 before UNIT_CELLS): the call resumes
            grid.prompts_per_unit = kept
            manifest = folder_manifest(grid, shape, source_position, readout, options, settings)
        return _sweep_to_folder(source_prompts, grid, shape, out, distributed, progress, manifest, settings)
    prompts = prompt_list(source_prompts)
    units = list(chunks(prompts, per_unit))
    mine = my_units(len(units), distributed)
    parts = {}
    per_prompt = grid.cells_per_prompt
    with tqdm(
        total=sum(len(units[u]) for u in mine) * per_prompt,
        unit="cell",
        desc="sweep",
        disable=not (progress if progress is not None else len(prompts) * per_prompt > 64),
    ) as bar:
        for u in mine:
            parts[u] = _run_unit(grid, shape, list(units[u]), settings)
            bar.update(len(units[u]) * per_prompt)
    parts = gather_units(parts, distributed)
    ordered = [parts[u] for u in range(len(units))]
    return _assemble(shape, prompts, ordered, grid.scope_for(prompts), _tokenizer(grid, prompts))


def _tokenizer(grid: Grid, prompts: list[str]) -> Any:
    """The target model M*'s tokenizer, which decodes every cell's token ids."""
    return grid.models[grid.make(prompts[0], *grid.pairs[0][0]).target_model].tokenizer


def _run_unit(grid: Grid, shape: Shape, prompts: list[str], settings: VerifySettings | None) -> dict[str, Any]:
    """One unit's cells (`run_unit`), and where the sweep verifies, their checks in cell order under
    ``"verifications"``: the unit's cells in one `verify` call, so that one (S, l) shares its controls across l*, on
    the sweep's path (``planned``), under the sweep's own progress bar."""
    if settings is None:
        return run_unit(grid, prompts)
    check_cell(settings, grid.make(prompts[0], *grid.pairs[0][0]))
    part = run_unit(grid, prompts)
    unit = _assemble(shape, prompts, [part], grid.scope_for(prompts), _tokenizer(grid, prompts))
    checks = verify_cells(unit, grid.models, settings, grid.forward_batch, grid.planned, progress=False)  # sweep's bar
    return {**part, "verifications": checks}


def _assemble(
    shape: Shape,
    prompts: list[str],
    ordered: list[dict[str, Any]],
    scope_for,
    tokenizer,
    top_tokens: list[str] | None = None,
) -> "SweepResult":
    generations = None if ordered[0]["generations"] is None else [g for part in ordered for g in part["generations"]]
    cat = lambda key: torch.cat([part[key] for part in ordered])  # noqa: E731
    return SweepResult(
        preset=shape.preset,
        prompts=prompts,
        source_layers=shape.source_layers,
        target_layers=shape.target_layers,
        top_probs=cat("top_probs"),
        top_ids=cat("top_ids"),
        source_positions=[p for part in ordered for p in part["source_positions"]],
        target_positions=cat("target_positions"),
        scope_for=scope_for,
        same_layer=shape.same_layer,
        tokenizer=tokenizer,
        generations=generations,
        logits=cat("logits") if ordered[0].get("logits") is not None else None,
        informative=cat("informative"),
        top_tokens=top_tokens,
        verifications=[v for part in ordered for v in part["verifications"]] if "verifications" in ordered[0] else None,
    )


# ---- out=folder: streamed, one shard per unit, resumable ------------------------------------------------------
def _sweep_to_folder(
    source_prompts: Any,
    grid: Grid,
    shape: Shape,
    out: str | os.PathLike,
    distributed: bool | None,
    progress: bool | None,
    manifest: dict[str, Any],
    settings: VerifySettings | None,
) -> SweepFolder:
    """Each unit this process owns (round robin under accelerate) computed unless its shard is already there."""
    rank, size, barrier, is_main = process_slot(distributed)
    folder = open_folder(out, manifest) if is_main else None
    barrier()  # the main process creates the folder and its manifest before the others check it
    folder = folder or open_folder(out, manifest, clean=False)
    done = SweepFolder(folder, manifest)
    total = getattr(source_prompts, "__len__", None)
    per_prompt = grid.cells_per_prompt
    count, units = 0, []  # units: every unit's prompts' hash, this process's or not, for the completion record
    with tqdm(
        total=None if total is None else len(source_prompts) * per_prompt,
        unit="cell",
        desc="sweep",
        disable=not (progress if progress is not None else True),
    ) as bar:
        for u, prompts in enumerate(prompt_units(source_prompts, grid.prompts_per_unit)):
            first, count = count, count + len(prompts)
            units.append(prompts_sha256(prompts))
            if u % size != rank:
                continue
            if finished(folder, u, prompts, manifest):
                done.skipped.append(u)
            else:
                if not done.computed:
                    unfinish(folder)  # the old completion record no longer holds once a shard changes
                part = _run_unit(grid, shape, prompts, settings)
                tokenizer = _tokenizer(grid, prompts)
                table = unit_table(
                    u,
                    first,
                    prompts,
                    part,
                    shape.source_layers,
                    shape.target_layers,
                    shape.same_layer,
                    top_texts(tokenizer, part["top_ids"][..., 0]),
                    part.get("verifications"),
                )
                write_shard(folder, u, table, manifest["spec_hash"])
                done.computed.append(u)
            bar.update(len(prompts) * per_prompt)
    barrier()
    if is_main:
        mark_complete(folder, units, count, manifest["spec_hash"])
    barrier()
    return done


def load_sweep(
    folder: str | os.PathLike, model: ModelHandle | Any = None, partial: bool = False, lazy: bool = False
) -> SweepResult | Any:
    """Read a sweep folder written by ``sweep(..., out=folder)`` back into memory, as a `SweepResult`.

    ``model`` (the handle the sweep ran on) makes its cells' specs and tokenizer available (``cell``, ``results``,
    `export.sweep_figure`); without it the tensors, prompts, top-1 tokens and generations load.
    ``partial=True`` reads an unfinished sweep's finished units; ``lazy=True`` returns every cell as a
    `datasets.Dataset` memory-mapped from the shards instead. A model other than the sweep's is refused (its
    tokenizer would decode the cells' token ids, and its name label them), and so is a folder whose records
    do not check (`persist.sweep_records`).
    """
    path = expand(folder)
    manifest = read_manifest(path)
    handle = None if model is None else as_models(model)
    if handle is not None:
        check_models(path, manifest, handle)
    if lazy:
        return load_dataset(path, partial)
    tables = read_units(path, partial)
    if not tables:
        raise SpecError(f"{path} holds no finished unit yet (allowed: a folder with at least one shard)")
    settings = recorded_settings(manifest)
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
    return SweepResult(
        preset=manifest["preset"],
        prompts=prompts,
        source_layers=source_layers,
        target_layers=target_layers,
        top_probs=column_tensor(tables, "top_probs", torch.float32).reshape(*shape, -1),
        top_ids=top_ids.reshape(*shape, -1),
        source_positions=[int(x) for t in tables for x in t.column("source_position").to_pylist()[::per_prompt]],
        target_positions=column_tensor(tables, "target_position", torch.long).reshape(shape),
        scope_for=_scopes_from(manifest, prompts, handle),
        same_layer=same,
        tokenizer=None if handle is None else next(iter(handle.values())).tokenizer,
        generations=None if all(g is None for g in generations) else generations,
        logits=None if logits is None else logits.reshape(*shape, -1),
        informative=column_tensor(tables, "informative", torch.bool).reshape(shape),
        top_tokens=[x for t in tables for x in t.column("token").to_pylist()],
        verifications=None if settings is None else recorded_checks(tables, settings),
    )


__all__ = ["sweep", "load_sweep", "SweepResult", "SweepFolder", "READOUTS"]
