"""The explorer without the web: the Patchscopes for one clicked token, checked, and the three kinds of work.

`Explorer` turns a `Query` into Patchscopes and runs them with `engine.run` (the planned execution), so a
table row or a heatmap cell is exactly what ``run`` gives for the same scope:

- ``layers``: one scope per source layer l, at the preset's own l* (l* = l for token identity);
- ``grid``: one scope per (l, l*) pair, the source layer x target layer heatmap;
- ``jacobian``: Jacobian Scopes over the prompt's tokens for its next-token prediction.

Catalogue entries are offered only where they apply (`entries`). A query with ``verify`` also checks each row's and
cell's reading by putting it back (`execution.verify`, with the explorer's `VerifySettings`; `verdicts`).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import threading
import warnings
from typing import Any, Callable

from ..errors import SpecError, UnknownNameError
from ..execution.engine import run
from ..execution.sweeps import sweep
from ..export import layers_table, result_cell
from ..export.html import verdict_legend
from ..models import ModelHandle
from ..persist import WEIGHTS_FILE, catalogue, load_patchscope
from ..presets import PRESETS, get_preset
from ..resolve import resolve
from ..result import PatchscopeResult, show_text
from ..result.verify import Verification
from ..spec import Patchscope, Source
from ..spec.verify import VerifySettings
from .entries import Entry
from .query import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, FieldError, Query, field_of, json_type
from .verdicts import check_settings, checks, verdict_json

# The presets the page offers: each runs on the explorer's one model. The decoder presets write into a second model
# (a PEFT adapter); the Jacobian lens comes as its catalogue entries (jacobian-lens-lNN), one fitted layer each.
OFFERED = tuple(name for name, preset in PRESETS.items() if not (preset.needs_decoder or preset.needs_lens))
CUSTOM = "custom"
PLACEHOLDER = "x"
TOP = 5
GRID_NEW_TOKENS = 2  # the heatmap's generations: each token more costs ~1.6 s on 900 SmolLM2 cells (2 CPU cores)
GRID_SLICES = 3  # the heatmap runs in slices of source layers: progress and cancel between them
CUSTOM_NEW_TOKENS = 10
VARIANTS = ("semantic", "fisher", "temperature")
KINDS = ("layers", "grid", "jacobian")
NOT_APPLICABLE = "n/a"


class Explorer:
    """Patchscopes on one model for the page: tokens, checked queries, and the three kinds of work."""

    def __init__(
        self, handle: ModelHandle, max_prompt_tokens: int = MAX_PROMPT_TOKENS, verify: VerifySettings | None = None
    ):
        self.handle = handle
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.verify = verify or VerifySettings()  # how a query with verify checks its readings
        # requests are checked on the web threads with a tokenizer of their own: a fast tokenizer must not
        # be used from two threads at once, and the model's belongs to the worker
        self._checking = ModelHandle(handle.name, handle.model, copy.deepcopy(handle.tokenizer), handle.origin)
        self._check_lock = threading.RLock()
        # catalogue entries read from disk once, not once per scope (a heatmap builds 900 scopes)
        self._saved = {
            name: Entry.of(load_patchscope(name), handle.n_layers) for name in catalogue() if name not in PRESETS
        }
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
        fitted = {name: list(layers) for name in self.catalogue if (layers := self._saved[name].fitted)}
        return {
            "model": self.handle.name,
            "n_layers": self.handle.n_layers,
            "presets": list(OFFERED),
            "catalogue": self.catalogue,
            "fitted": fitted,
            "custom": CUSTOM,
            "placeholder": PLACEHOLDER,
            "variants": list(VARIANTS),
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_prompt_tokens": self.max_prompt_tokens,
            "verify": self.verify.to_dict(),
        }

    def tokens(self, prompt: Any) -> dict[str, Any]:
        """The prompt's tokens as the model sees them (the tokenizer's own prefix, position 0, is marked; `text`
        raw, `label` as `show_text` writes it), and what the page should warn about."""
        query = Query.from_json({"prompt": prompt})
        with self._check_lock:
            tokenizer = self._checking.tokenizer
            encoded = tokenizer(query.prompt, add_special_tokens=True, return_special_tokens_mask=True)
            ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
            notes = self._length_notes(len(ids))
            texts = [tokenizer.decode([i]) for i in ids]
        return {
            "tokens": [
                {"index": k, "text": text, "label": show_text(text), "special": bool(flag)}
                for k, (text, flag) in enumerate(zip(texts, special))
            ],
            "warnings": notes,
        }

    def _length_notes(self, n: int) -> list[str]:
        """Refuse a prompt past the explorer's cap or a model's learned positions; note one past a rotary
        model's trained length (`resolve.check_context` warns the same way)."""
        if n > self.max_prompt_tokens:
            raise FieldError(
                "prompt",
                f"prompt has {n} tokens (allowed: at most {self.max_prompt_tokens} in the "
                "explorer; patchscopes explore --max-prompt-tokens raises the cap)",
            )
        limit, encoding = self.handle.context
        if limit is None or n <= limit:
            return []
        if encoding == "absolute":
            raise FieldError(
                "prompt",
                f"prompt has {n} tokens, past {self.handle.name}'s {limit} learned positions "
                f"(allowed: at most {limit})",
            )
        return [
            f"the prompt has {n} tokens, past {self.handle.name}'s trained length of {limit} ({encoding} "
            "positions extrapolate; expect degraded outputs)"
        ]

    # ---- queries -> Patchscopes ----------------------------------------------------------------------
    def scope(
        self, query: Query, layer: int, target_layer: int | None = None, grid: bool = False, tokenizer: Any = None
    ) -> Patchscope:
        """The Patchscope that reads (prompt, position) at source layer `layer` (and l* where given).

        `tokenizer` cuts the prompt for the logit lens: the worker passes the model's own; web threads use
        the checking copy, under the check lock (a fast tokenizer must not be shared between threads).
        """
        source = Source(query.prompt, query.position, layer, self.handle.name)
        tokenizer = tokenizer if tokenizer is not None else self._checking.tokenizer
        if query.preset == CUSTOM:  # the attribute preset's shape: the state replaces the placeholder word
            if not query.target_prompt or not re.search(rf"\b{PLACEHOLDER}\b", query.target_prompt):
                raise FieldError(
                    "target_prompt",
                    "target_prompt has no placeholder word "
                    f"{PLACEHOLDER!r} (allowed: a prompt such as 'The capital of x')",
                )
            scope = get_preset("attribute").build(
                source, target_layer=target_layer, target_prompt=query.target_prompt, max_new_tokens=CUSTOM_NEW_TOKENS
            )
        elif query.preset in PRESETS and query.preset not in OFFERED:
            raise FieldError(
                "preset",
                f"preset={query.preset!r} needs what the page does not have (a trained decoder, "
                "or a fitted lens: use its catalogue entries) (allowed: "
                f"{', '.join(OFFERED)}, the catalogue entries, or {CUSTOM!r})",
            )
        elif query.preset in PRESETS:
            options: dict[str, Any] = {}
            if PRESETS[query.preset].needs_tokenizer:
                options["tokenizer"] = tokenizer
            if PRESETS[query.preset].reroutes:
                raise FieldError(
                    "preset",
                    "preset='multihop' reroutes within one pass and has no clickable "
                    "token (allowed: the other presets, the catalogue, or custom)",
                )
            reason = self.not_applicable(query, layer, target_layer)
            if reason is not None:
                raise FieldError("target_layer", reason)
            scope = get_preset(query.preset).build(
                source, target_layer=target_layer, n_layers=self.handle.n_layers, **options
            )
        elif query.preset in self._saved:
            scope = self._saved[query.preset].at(query.preset, source, target_layer, tokenizer)
        else:
            raise FieldError(
                "preset",
                f"preset={query.preset[:80]!r} is not known (allowed: {', '.join(OFFERED)}, "
                f"the catalogue entries, or {CUSTOM!r})",
            )
        if grid:
            scope = scope.replace(max_new_tokens=min(scope.max_new_tokens, GRID_NEW_TOKENS))
        return scope

    def not_applicable(self, query: Query, layer: int, target_layer: int | None = None) -> str | None:
        """Why the query's preset does not apply at (l, l*) on this model, None where it does (a preset that
        fixes l*, the logit lens, applies there only)."""
        preset = PRESETS.get(query.preset)
        if preset is not None:
            n = self.handle.n_layers
            return None if preset.allows(target_layer, n) else f"{preset.fixes(n)}; not run at other l*"
        entry = self._saved.get(query.preset)
        return None if entry is None else entry.reason(query.preset, layer, target_layer)

    def _layers(self, query: Query) -> list[int]:
        """The source layers where the query's preset applies at its own l*."""
        return [l for l in range(self.handle.n_layers) if self.not_applicable(query, l) is None]

    def check(self, query: Query, kind: str) -> list[str]:
        """Refuse a bad query before it is queued (resolving one scope checks the prompt, token and target);
        return what the page should warn about."""
        if kind not in KINDS:
            raise FieldError("kind", f"kind={kind[:40]!r} is not known (allowed: {', '.join(KINDS)})")
        if kind == "jacobian" and query.variant not in VARIANTS:
            raise FieldError("variant", f"variant={query.variant[:40]!r} is not known (allowed: {', '.join(VARIANTS)})")
        with self._check_lock:
            n = len(self._checking.tokenizer(query.prompt, add_special_tokens=True)["input_ids"])
            notes = self._length_notes(n)
        if not -n <= query.position < n:
            raise FieldError(
                "position", f"position={query.position} is outside the prompt's {n} tokens (allowed: 0..{n - 1})"
            )
        if kind != "jacobian":
            first = (self._layers(query) or [0])[0]  # a fitted entry's own layer; none in range: 0, resolve says why
            with self._check_lock:
                self._resolve(self.scope(query, first))
                if query.verify:
                    check_settings(self._checking, self.verify)
        return notes

    def _resolve(self, scope: Patchscope) -> None:
        try:
            with self._check_lock, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                resolve(scope, {self.handle.name: self._checking})
        except (SpecError, UnknownNameError) as error:
            raise FieldError(field_of(error), str(error)) from None

    def spec(self, query: Query, source_layer: Any, target_layer: Any) -> dict[str, Any]:
        """The cell's Patchscope as spec JSON, with the Python and command lines that run it."""
        n = self.handle.n_layers
        for name, value in (("source_layer", source_layer), ("target_layer", target_layer)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
                shown = value if isinstance(value, int) and not isinstance(value, bool) else json_type(value)
                raise FieldError(name, f"{name}={shown} is out of range for {self.handle.name} (allowed: 0..{n - 1})")
        reason = self.not_applicable(query, source_layer, target_layer)
        if reason is not None:  # a preset's fixed l*, or a catalogue entry's fitted (l, l*)
            raise FieldError("target_layer" if query.preset in PRESETS else "source_layer", reason)
        with self._check_lock:
            scope = self.scope(query, source_layer, target_layer, grid=True)
            self._resolve(scope)
        if query.verify:  # saved with the spec, so that the cell's check reruns exactly
            scope = scope.replace(verify=self.verify)
        data, copy = scope.to_dict(), ""
        made = f"scope = Patchscope.from_dict({data!r})"
        if scope.mapping_spec.weights:  # a fitted map lives in the catalogue entry's safetensors file, not in JSON
            data["mapping"]["weights"] = WEIGHTS_FILE
            made = (
                f"scope = load_patchscope({query.preset!r}).replace(source={scope.source!r}, target={scope.target!r})"
            )
            copy = (
                "cp \"$(python -c 'from pyvene_patchscopes.persist import catalogue_root; "
                f"print(catalogue_root())')/{query.preset}/{WEIGHTS_FILE}\" cell/\n"
            )
        text = json.dumps(data, indent=2)
        python = (
            f"from pyvene_patchscopes import Patchscope, Source, Target, load_model, load_patchscope, run\n"
            f"{made}\n"
            f"result = run(scope, load_model({self.handle.name!r}))[0]"
        )
        command = (
            f"mkdir -p cell && cat > cell/config.json <<'EOF'\n{text}\nEOF\n{copy}"
            f"patchscopes run ./cell --model {shlex.quote(self.handle.name)}"
        )
        return {"spec": data, "json": text, "python": python, "cli": command}

    # ---- the work (on the worker thread) -------------------------------------------------------------
    def layers(self, query: Query, step: Callable[[float], None]) -> dict[str, Any]:
        own = self.handle.tokenizer
        applies = self._layers(query)
        results = dict(zip(applies, self._run([self.scope(query, l, tokenizer=own) for l in applies], step)))
        verified = self._checks(query, results)
        table = layers_table(list(results.values()), list(verified.values()) if verified else None)
        rows = {row["key"]: row for row in table["rows"]}
        table["rows"], out = [], []
        for l in range(self.handle.n_layers):
            if l in results:
                table["rows"].append(rows[l])
                out.append({**_result_json(results[l]), **verdict_json(verified.get(l))})
                continue
            reason = self.not_applicable(query, l)
            cells = [NOT_APPLICABLE, "", reason] + ([""] if verified else [])
            table["rows"].append({"key": l, "muted": True, "tip": [reason], "cells": cells})
            out.append(
                {
                    "layer": l,
                    "target_layer": None,
                    "top": [],
                    "generation": None,
                    "informative": False,
                    "applies": False,
                    "reason": reason,
                }
            )
        if len(results) < self.handle.n_layers:
            table["note"] = f"rows marked {NOT_APPLICABLE}: {self._saved[query.preset].note(query.preset)}"
        first = next(iter(results.values()))
        return {"table": table, "results": out, "source_position": first.source_position}

    def grid(self, query: Query, step: Callable[[float], None]) -> dict[str, Any]:
        """Every (l, l*) cell, in slices of source layers (progress, cancel): a planned sweep for the presets
        (top-k only, no full logits), `run` for catalogue entries."""
        layers = list(range(self.handle.n_layers))
        size = -(-len(layers) // GRID_SLICES)
        slices = [layers[k : k + size] for k in range(0, len(layers), size)]
        rows: list[list[dict[str, Any]]] = []
        for done, part in enumerate(slices):
            step(done / len(slices))
            rows += self._grid_rows(query, part, layers)
        step(1.0)
        grid = {
            "title": f"{query.preset}: source layer x target layer",
            "row_label": "source layer l",
            "col_label": "target layer l*",
            "rows": layers,
            "cols": layers,
            "cells": rows,
            "origin": "lower",
        }
        entry, preset = self._saved.get(query.preset), PRESETS.get(query.preset)
        if entry is not None and entry.fitted:
            grid["note"] = f"cells marked {NOT_APPLICABLE}: {entry.note(query.preset)}"
        if preset is not None and preset.target_layer is not None:
            grid["note"] = f"cells marked {NOT_APPLICABLE}: {preset.fixes(self.handle.n_layers)}"
        if query.verify:
            grid["legend"] = verdict_legend(cell.get("verdict") for row in rows for cell in row)
        return {"grid": grid}

    def _grid_rows(self, query: Query, sources: list[int], targets: list[int]) -> list[list[dict[str, Any]]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uninformative cells are marked in the result instead
            if query.preset in OFFERED or query.preset == CUSTOM:  # a fixed l* (the logit lens): that column only
                swept = [t for t in targets if self.not_applicable(query, sources[0], t) is None]
                template = self.scope(query, sources[0], swept[0], grid=True, tokenizer=self.handle.tokenizer)
                preset = "attribute" if query.preset == CUSTOM else query.preset
                options: dict[str, Any] = {"max_new_tokens": template.max_new_tokens}
                if query.preset == CUSTOM:
                    options["target_prompt"] = query.target_prompt
                grid = sweep(
                    query.prompt,
                    self.handle,
                    preset=preset,
                    source_position=query.position,
                    source_layers=sources,
                    target_layers=swept,
                    top=TOP,
                    keep_logits=False,
                    progress=False,
                    **options,
                )
                if query.verify:
                    grid.verifications = checks(grid, self.handle, self.verify)
                verified = dict(zip([(l, t) for l in sources for t in swept], grid.verifications or []))
                return [
                    [
                        result_cell(grid.cell(0, l, t), verified.get((l, t)))
                        if t in swept
                        else _not_applicable_cell(l, t, str(self.not_applicable(query, l, t)))
                        for t in targets
                    ]
                    for l in sources
                ]
            pairs = [(l, t) for l in sources for t in targets if self.not_applicable(query, l, t) is None]
            scopes = [self.scope(query, l, t, grid=True, tokenizer=self.handle.tokenizer) for l, t in pairs]
            results = dict(zip(pairs, run(scopes, self.handle, top=TOP, progress=False))) if scopes else {}
        verified = self._checks(query, results)
        return [
            [
                result_cell(results[l, t], verified.get((l, t)))
                if (l, t) in results
                else _not_applicable_cell(l, t, str(self.not_applicable(query, l, t)))
                for t in targets
            ]
            for l in sources
        ]

    def _checks(self, query: Query, results: dict[Any, PatchscopeResult]) -> dict[Any, Verification]:
        """Each result's verification by its key, where the query asks for them (none else)."""
        if not query.verify or not results:
            return {}
        return dict(zip(results, checks(list(results.values()), self.handle, self.verify)))

    def jacobian(self, query: Query, step: Callable[[float], None]) -> dict[str, Any]:
        from ..jacobian import jacobian_scope

        step(0.0)
        attribution = jacobian_scope(query.prompt, self.handle, variant=query.variant, progress=False)
        step(1.0)
        normalised = attribution.normalised()
        return {
            "variant": query.variant,
            "prediction": attribution.prediction,
            "prediction_label": show_text(attribution.prediction),
            "tokens": [
                {"index": p, "text": t, "label": show_text(t), "score": s, "shade": n}
                for p, t, s, n in zip(attribution.positions, attribution.tokens, attribution.scores, normalised)
            ],
        }

    def _run(self, scopes: list[Patchscope], step: Callable[[float], None]) -> list[PatchscopeResult]:
        step(0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uninformative rows are marked in the result instead
            results = run(scopes, self.handle, top=TOP, progress=False)
        step(1.0)
        return results


def _not_applicable_cell(layer: int, target_layer: int, reason: str) -> dict[str, Any]:
    return {"label": NOT_APPLICABLE, "shade": None, "tip": [f"l = {layer}, l* = {target_layer}", reason], "muted": True}


def _result_json(result: PatchscopeResult) -> dict[str, Any]:
    return {
        "layer": result.scope.source.layer,
        "target_layer": result.scope.target.layer,
        "top": [[t.token, t.prob] for t in result.top],
        "generation": result.generation,
        "informative": result.informative,
        "applies": True,
        "reason": None,
    }


__all__ = ["Explorer", "Entry", "OFFERED", "CUSTOM", "PLACEHOLDER", "VARIANTS", "KINDS", "NOT_APPLICABLE"]
