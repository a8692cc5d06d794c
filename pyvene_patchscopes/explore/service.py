"""What the explorer computes, without the web: Patchscopes for one clicked token, checked, queued, cancellable.

A `Query` is what the page sends (a source prompt, a token of it, a preset or a custom target prompt with
the placeholder ``x``). `Explorer` turns it into Patchscopes and runs them with `engine.run` (the planned
execution), so a table row or a heatmap cell is exactly what ``run`` gives for the same scope:

- ``layers``: one scope per source layer l, at the preset's own l* (l* = l for token identity);
- ``grid``: one scope per (l, l*) pair, the source layer x target layer heatmap;
- ``jacobian``: Jacobian Scopes over the prompt's tokens for its next-token prediction.

All model work runs on one worker thread (`Jobs`), so many browser tabs queue on the one model. Bad input
raises `FieldError`, which names the field the page should point at.
"""
from __future__ import annotations

import copy
import itertools
import re
import shlex
import threading
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from ..engine import run
from ..errors import PatchscopeError, SpecError, UnknownNameError
from ..export import layers_table, result_cell
from ..models import ModelHandle
from ..persist import catalogue
from ..presets import PRESETS, get_preset
from ..resolve import resolve
from ..result import PatchscopeResult
from ..spec import Patchscope, Source
from ..sweep import sweep

CUSTOM = "custom"
PLACEHOLDER = "x"
TOP = 5
GRID_NEW_TOKENS = 2     # the heatmap's generations: each token more costs ~1.6 s on 900 SmolLM2 cells (2 CPU cores)
GRID_SLICES = 3         # the heatmap runs in slices of source layers: progress and cancel between them
CUSTOM_NEW_TOKENS = 10
VARIANTS = ("semantic", "fisher", "temperature")
KINDS = ("layers", "grid", "jacobian")


class FieldError(PatchscopeError):
    """Bad input from the page: `field` names the input the message is about."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Cancelled(Exception):
    """The job was cancelled from the page."""


@dataclass(frozen=True)
class Query:
    """What the page asks about: a token of a source prompt, read with a preset (or a custom target prompt)."""

    prompt: str
    position: int = -1
    preset: str = "token-identity"
    target_prompt: str | None = None
    variant: str = "semantic"

    @classmethod
    def from_json(cls, data: Any) -> "Query":
        if not isinstance(data, dict):
            raise FieldError("request", "the request must be a JSON object")
        prompt, position = data.get("prompt"), data.get("position", -1)
        if not isinstance(prompt, str) or not prompt.strip():
            raise FieldError("prompt", "prompt is empty (allowed: some text)")
        if isinstance(position, bool) or not isinstance(position, int):
            raise FieldError("position", f"position={position!r} is not a token index (allowed: an integer)")
        preset = data.get("preset") or "token-identity"
        target_prompt = data.get("target_prompt") or None
        variant = data.get("variant") or "semantic"
        for field, value in (("preset", preset), ("target_prompt", target_prompt), ("variant", variant)):
            if value is not None and not isinstance(value, str):
                raise FieldError(field, f"{field}={value!r} is not text")
        return cls(prompt, position, preset, target_prompt, variant)


def _field_of(error: Exception) -> str:
    """Which input a library error is about, from the field it names (Source.position, Target.layer, ...)."""
    text = str(error)
    for needle, field in (("Source.position", "position"), ("Target.position", "target_prompt"),
                          ("Target.prompt", "target_prompt"), ("Source.layer", "source_layer"),
                          ("Target.layer", "target_layer"), ("Source.prompt", "prompt"), ("preset", "preset"),
                          ("variant", "variant"), ("text", "prompt")):
        if needle in text:
            return field
    return "request"


class Explorer:
    """Patchscopes on one model for the page: tokens, checked queries, and the three kinds of work."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        # requests are checked on the web threads with a tokenizer of their own: a fast tokenizer must not
        # be used from two threads at once, and the model's belongs to the worker
        self._checking = ModelHandle(handle.name, handle.model, copy.deepcopy(handle.tokenizer), handle.origin)
        self._check_lock = threading.RLock()
        # catalogue entries read from disk once, not once per scope (a heatmap builds 900 scopes)
        self._saved = {name: Patchscope.load(name) for name in catalogue() if name not in PRESETS}
        self.catalogue = [name for name in self._saved if self._fits(name)]

    def _fits(self, name: str) -> bool:
        """Whether catalogue entry `name` runs on this one model (same-model, a mapping of this model's size)."""
        try:
            self.check(Query("a b", -1, name), "layers")
        except FieldError:
            return False
        return True

    # ---- what the page shows before any work -------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"model": self.handle.name, "n_layers": self.handle.n_layers, "presets": list(PRESETS),
                "catalogue": self.catalogue, "custom": CUSTOM, "placeholder": PLACEHOLDER, "variants": list(VARIANTS)}

    def tokens(self, prompt: Any) -> list[dict[str, Any]]:
        """The prompt's tokens as the model sees them; the tokenizer's own prefix (position 0) is marked."""
        query = Query.from_json({"prompt": prompt})
        with self._check_lock:
            tokenizer = self._checking.tokenizer
            encoded = tokenizer(query.prompt, add_special_tokens=True, return_special_tokens_mask=True)
            ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
            texts = [tokenizer.decode([i]) for i in ids]
        return [{"index": k, "text": text, "special": bool(flag)} for k, (text, flag) in
                enumerate(zip(texts, special))]

    # ---- queries -> Patchscopes ----------------------------------------------------------------------
    def scope(self, query: Query, layer: int, target_layer: int | None = None, grid: bool = False,
              tokenizer: Any = None) -> Patchscope:
        """The Patchscope that reads (prompt, position) at source layer `layer` (and l* where given).

        `tokenizer` cuts the prompt for the logit lens: the worker passes the model's own; web threads use
        the checking copy, under the check lock (a fast tokenizer must not be shared between threads).
        """
        source = Source(query.prompt, query.position, layer, self.handle.name)
        if query.preset == CUSTOM:  # the attribute preset's shape: the state replaces the placeholder word
            if not query.target_prompt or not re.search(rf"\b{PLACEHOLDER}\b", query.target_prompt):
                raise FieldError("target_prompt", f"target_prompt={query.target_prompt!r} has no placeholder word "
                                                  f"{PLACEHOLDER!r} (allowed: a prompt such as 'The capital of x')")
            scope = get_preset("attribute").build(source, target_layer=target_layer, target_prompt=query.target_prompt,
                                                  max_new_tokens=CUSTOM_NEW_TOKENS)
        elif query.preset in PRESETS:
            options: dict[str, Any] = {}
            if query.preset == "logit-lens":
                options["tokenizer"] = tokenizer if tokenizer is not None else self._checking.tokenizer
            if query.preset == "multihop":
                raise FieldError("preset", "preset='multihop' reroutes within one pass and has no clickable "
                                           "token (allowed: the other presets, the catalogue, or custom)")
            scope = get_preset(query.preset).build(source, target_layer=target_layer, **options)
        elif query.preset in self._saved:
            saved = self._saved[query.preset]
            if saved.reroute is not None or saved.target.model not in (None, saved.source.model):
                raise FieldError("preset", f"preset={query.preset!r} reroutes within one pass or reads across two "
                                           "models (allowed here: a catalogue entry on one model)")
            target = replace(saved.target, model=None,
                             layer=saved.target.layer if target_layer is None else target_layer)
            scope = replace(saved, source=source, target=target)
        else:
            raise FieldError("preset", f"preset={query.preset!r} is not known (allowed: {', '.join(PRESETS)}, "
                                       f"the catalogue entries, or {CUSTOM!r})")
        if grid:
            scope = scope.replace(max_new_tokens=min(scope.max_new_tokens, GRID_NEW_TOKENS))
        return scope

    def check(self, query: Query, kind: str) -> None:
        """Refuse a bad query before it is queued: resolving one scope checks the prompt, token and target."""
        if kind not in KINDS:
            raise FieldError("kind", f"kind={kind!r} is not known (allowed: {', '.join(KINDS)})")
        if kind == "jacobian" and query.variant not in VARIANTS:
            raise FieldError("variant", f"variant={query.variant!r} is not known (allowed: {', '.join(VARIANTS)})")
        with self._check_lock:
            n = len(self._checking.tokenizer(query.prompt, add_special_tokens=True)["input_ids"])
        if not -n <= query.position < n:
            raise FieldError("position", f"position={query.position} is outside the prompt's {n} tokens "
                                         f"(allowed: 0..{n - 1})")
        if kind != "jacobian":
            with self._check_lock:
                self._resolve(self.scope(query, 0))

    def _resolve(self, scope: Patchscope) -> None:
        try:
            with self._check_lock, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resolve(scope, {self.handle.name: self._checking})
        except (SpecError, UnknownNameError) as error:
            raise FieldError(_field_of(error), str(error)) from None

    def spec(self, query: Query, source_layer: Any, target_layer: Any) -> dict[str, Any]:
        """The cell's Patchscope as spec JSON, with the Python and command lines that run it."""
        n = self.handle.n_layers
        for field, value in (("source_layer", source_layer), ("target_layer", target_layer)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                raise FieldError(field, f"{field}={value!r} is out of range for {self.handle.name} "
                                        f"(allowed: 0..{n - 1})")
        with self._check_lock:
            scope = self.scope(query, source_layer, target_layer, grid=True)
            self._resolve(scope)
        text = scope.to_json()
        python = (f"from pyvene_patchscopes import Patchscope, load_model, run\n"
                  f"scope = Patchscope.from_dict({scope.to_dict()!r})\n"
                  f"result = run(scope, load_model({self.handle.name!r}))[0]")
        command = (f"mkdir -p cell && cat > cell/config.json <<'EOF'\n{text}\nEOF\n"
                   f"patchscopes run ./cell --model {shlex.quote(self.handle.name)}")
        return {"spec": scope.to_dict(), "json": text, "python": python, "cli": command}

    # ---- the work (on the worker thread) -------------------------------------------------------------
    def layers(self, query: Query, step: Callable[[float], None]) -> dict[str, Any]:
        layers = list(range(self.handle.n_layers))
        own = self.handle.tokenizer
        results = self._run([self.scope(query, l, tokenizer=own) for l in layers], step)
        return {"table": layers_table(results), "results": [_result_json(r) for r in results],
                "source_position": results[0].source_position}

    def grid(self, query: Query, step: Callable[[float], None]) -> dict[str, Any]:
        """Every (l, l*) cell, in slices of source layers (progress, cancel): a planned sweep for the presets
        (top-k only, no full logits), `run` for catalogue entries."""
        layers = list(range(self.handle.n_layers))
        size = -(-len(layers) // GRID_SLICES)
        slices = [layers[k:k + size] for k in range(0, len(layers), size)]
        rows: list[list[dict[str, Any]]] = []
        for done, part in enumerate(slices):
            step(done / len(slices))
            rows += self._grid_rows(query, part, layers)
        step(1.0)
        return {"grid": {"title": f"{query.preset}: source layer x target layer", "row_label": "source layer l",
                         "col_label": "target layer l*", "rows": layers, "cols": layers, "cells": rows,
                         "origin": "lower"}}

    def _grid_rows(self, query: Query, sources: list[int], targets: list[int]) -> list[list[dict[str, Any]]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uninformative cells are marked in the result instead
            if query.preset in PRESETS or query.preset == CUSTOM:
                template = self.scope(query, sources[0], targets[0], grid=True, tokenizer=self.handle.tokenizer)
                preset = "attribute" if query.preset == CUSTOM else query.preset
                options: dict[str, Any] = {"max_new_tokens": template.max_new_tokens}
                if query.preset == CUSTOM:
                    options["target_prompt"] = query.target_prompt
                grid = sweep(query.prompt, self.handle, preset=preset, source_position=query.position,
                             source_layers=sources, target_layers=targets, top=TOP, keep_logits=False,
                             progress=False, **options)
                return [[result_cell(grid.cell(0, l, t)) for t in targets] for l in sources]
            scopes = [self.scope(query, l, t, grid=True, tokenizer=self.handle.tokenizer) for l in sources
                      for t in targets]
            results = run(scopes, self.handle, top=TOP, progress=False)
        return [[result_cell(results[i * len(targets) + j]) for j in range(len(targets))]
                for i in range(len(sources))]

    def jacobian(self, query: Query, step: Callable[[float], None]) -> dict[str, Any]:
        from ..jacobian import jacobian_scope

        step(0.0)
        attribution = jacobian_scope(self.handle, query.prompt, variant=query.variant, progress=False)
        step(1.0)
        normalised = attribution.normalised()
        return {"variant": query.variant, "prediction": attribution.prediction,
                "tokens": [{"index": p, "text": t, "score": s, "shade": n} for p, t, s, n in
                           zip(attribution.positions, attribution.tokens, attribution.scores, normalised)]}

    def _run(self, scopes: list[Patchscope], step: Callable[[float], None]) -> list[PatchscopeResult]:
        step(0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uninformative rows are marked in the result instead
            results = run(scopes, self.handle, top=TOP, progress=False)
        step(1.0)
        return results


def _result_json(result: PatchscopeResult) -> dict[str, Any]:
    return {"layer": result.scope.source.layer, "target_layer": result.scope.target.layer,
            "top": [[t.token, t.prob] for t in result.top], "generation": result.generation,
            "informative": result.informative}


# ---- the queue ------------------------------------------------------------------------------------------
@dataclass
class Job:
    id: str
    kind: str
    query: Query
    state: str = "queued"      # queued | running | done | error | cancelled
    progress: float = 0.0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    cancel: threading.Event = None  # type: ignore[assignment]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state, "progress": round(self.progress, 3),
                "result": self.result, "error": self.error, "query": asdict(self.query)}


class Jobs:
    """One worker thread runs every job on the one model, in the order they came; finished jobs are kept
    for a while (the last `keep`) so that their pages can fetch them."""

    def __init__(self, explorer: Explorer, keep: int = 256):
        self.explorer, self.keep = explorer, keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: list[str] = []
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._work, name="patchscopes-explorer", daemon=True)
        self._worker.start()

    def submit(self, kind: str, query: Query) -> Job:
        self.explorer.check(query, kind)
        with self._lock:
            job = Job(str(next(self._ids)), kind, query, cancel=threading.Event())
            self._jobs[job.id] = job
            self._queue.append(job.id)
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
            self._lock.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state in ("queued", "running"):
                job.cancel.set()
                if job.state == "queued":
                    job.state = "cancelled"
            return job

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                job = self._jobs.get(self._queue.pop(0))
                if job is None or job.state != "queued":
                    continue
                job.state = "running"
            self._run(job)

    def _run(self, job: Job) -> None:
        def step(fraction: float) -> None:
            if job.cancel.is_set():
                raise Cancelled()
            job.progress = fraction

        try:
            job.result = getattr(self.explorer, job.kind)(job.query, step)
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
        except FieldError as error:
            job.error, job.state = {"field": error.field, "message": str(error)}, "error"
        except (PatchscopeError, ValueError, RuntimeError) as error:  # reported to the page, the worker lives on
            job.error, job.state = {"field": _field_of(error), "message": str(error)}, "error"


__all__ = ["Explorer", "Query", "Jobs", "Job", "FieldError", "CUSTOM", "PLACEHOLDER", "VARIANTS", "KINDS"]
