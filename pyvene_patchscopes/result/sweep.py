"""Pure data: a sweep's cells as tensors (`SweepResult`), and what a sweep written to a folder returns (`SweepFolder`).

A `SweepResult` holds the grid [prompt, source layer l, target layer l*] of top-k ids and probabilities; the
`PatchscopeResult` of a cell is built only when asked for. Running a sweep and reading a folder back are
`execution.sweeps` (`sweep`, `load_sweep`); its figure and page are `export` (`sweep_figure`, `sweep_page`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import SpecError
from ..spec import Patchscope
from .patchscope import PatchscopeResult, decode_top, token_text
from .verify import Verification, verify_columns

REMOVED_IN = "0.3.0"  # the release that removes the deprecated methods below


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated: use {new} (the old spelling is removed in {REMOVED_IN})",
        DeprecationWarning,
        stacklevel=3,
    )


@dataclass
class SweepResult:
    """A sweep's cells, indexed [prompt, source layer, target layer]; results are built on demand."""

    preset: str
    prompts: list[str]
    source_layers: list[int]
    target_layers: list[int]
    top_probs: torch.Tensor  # [P, Ls, Lt, k]
    top_ids: torch.Tensor  # [P, Ls, Lt, k]
    source_positions: list[int]
    target_positions: torch.Tensor  # [P, Ls, Lt]
    scope_for: Callable[[int, int, int], Patchscope] = field(repr=False)
    tokenizer: Any = field(repr=False)
    same_layer: bool = False  # target_layers="same": one cell per source layer, l* = l
    generations: list[str] | None = None  # flattened in cell order
    logits: torch.Tensor | None = field(default=None, repr=False)  # [P, Ls, Lt, vocab] when kept
    # [P, Ls, Lt] bool: False where the patch cannot reach the readout (l* = the last layer, written before the
    # target's last position), so the cell says nothing about the source
    informative: torch.Tensor | None = field(default=None, repr=False)
    top_tokens: list[str] | None = field(default=None, repr=False)  # top-1 texts, flattened (read from a folder)
    # each cell's check (sweep(..., verify=True)), flattened in cell order; None when the sweep was not verified
    verifications: list[Verification] | None = field(default=None, repr=False)
    _results: list[PatchscopeResult] | None = field(default=None, repr=False)

    @property
    def columns(self) -> int:
        return 1 if self.same_layer else len(self.target_layers)

    def _index(self, prompt: int, source_layer: int, target_layer: int) -> tuple[int, int, int]:
        if self.same_layer:
            if target_layer != source_layer:
                raise SpecError(
                    f"target_layer={target_layer}: this sweep ran l* = l only (allowed: target_layer == source_layer)"
                )
            return prompt, _position_of("source_layer", source_layer, self.source_layers), 0
        return (
            prompt,
            _position_of("source_layer", source_layer, self.source_layers),
            _position_of("target_layer", target_layer, self.target_layers),
        )

    def _result(self, p: int, i: int, j: int) -> PatchscopeResult:
        flat = (p * len(self.source_layers) + i) * self.columns + j
        target_layer = self.source_layers[i] if self.same_layer else self.target_layers[j]
        return PatchscopeResult(
            scope=self.scope_for(p, self.source_layers[i], target_layer),
            source_position=self.source_positions[p],
            target_position=int(self.target_positions[p, i, j]),
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
            self._results = [
                self._result(p, i, j) for p in range(shape[0]) for i in range(shape[1]) for j in range(shape[2])
            ]
        return self._results

    def _top_texts(self) -> list[str]:
        """The top-1 token text of every cell, flattened in (prompt, l, l*) order."""
        if self.top_tokens is None:
            if self.tokenizer is None:
                raise SpecError(
                    "this sweep was loaded without its model (allowed: load_sweep(folder, model=...) to decode tokens)"
                )
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
        targets = [[l] for l in self.source_layers] if self.same_layer else [self.target_layers] * n_source
        texts, probs = self._top_texts(), self.top_probs[..., 0].reshape(-1).tolist()
        informative = [True] * len(texts) if self.informative is None else self.informative.reshape(-1).tolist()
        generations: Sequence[str | None] = self.generations or [None] * len(texts)
        cells = ((p, l, t) for p in range(n) for i, l in enumerate(self.source_layers) for t in targets[i])
        checks = [{}] * len(texts) if self.verifications is None else [verify_columns(v) for v in self.verifications]
        return [
            {
                "prompt": self.prompts[p],
                "source_layer": l,
                "target_layer": t,
                "source_position": self.source_positions[p],
                "token": texts[c],
                "prob": probs[c],
                "generation": generations[c],
                "informative": informative[c],
                **checks[c],
            }
            for c, (p, l, t) in enumerate(cells)
        ]

    @classmethod
    def load(
        cls, folder: str | os.PathLike, model: Any = None, partial: bool = False, lazy: bool = False
    ) -> "SweepResult | Any":
        """Deprecated: `pyvene_patchscopes.load_sweep(folder, model, partial, lazy)`; removed in 0.3.0."""
        _deprecated("SweepResult.load(folder, ...)", "pyvene_patchscopes.load_sweep(folder, ...)")
        from ..execution.sweeps import load_sweep

        return load_sweep(folder, model, partial=partial, lazy=lazy)

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame.from_records(self.to_records())

    def plot(self, path: str | Path | None = None, prompt: int = 0):
        """Deprecated: `pyvene_patchscopes.export.sweep_figure(result, path, prompt)`; removed in 0.3.0."""
        _deprecated("SweepResult.plot(...)", "pyvene_patchscopes.export.sweep_figure(result, ...)")
        from ..export import sweep_figure

        return sweep_figure(self, path, prompt)

    def to_html(self, path: str | Path | None = None, prompt: int = 0) -> str:
        """Deprecated: `pyvene_patchscopes.export.sweep_page(result, path, prompt)`; removed in 0.3.0."""
        _deprecated("SweepResult.to_html(...)", "pyvene_patchscopes.export.sweep_page(result, ...)")
        from ..export import sweep_page

        return sweep_page(self, path, prompt)


@dataclass
class SweepFolder:
    """What ``sweep(..., out=folder)`` returns: the folder, its manifest, and which units this call computed."""

    path: Path
    manifest: dict[str, Any]
    computed: list[int] = field(default_factory=list)  # units this process computed in this call
    skipped: list[int] = field(default_factory=list)  # units this process found finished

    def load(self, model: Any = None) -> SweepResult:
        """Deprecated: `pyvene_patchscopes.load_sweep(folder.path, model)`; removed in 0.3.0."""
        _deprecated("SweepFolder.load(...)", "pyvene_patchscopes.load_sweep(folder.path, model)")
        from ..execution.sweeps import load_sweep

        return load_sweep(self.path, model)

    def dataset(self) -> Any:
        """Deprecated: `pyvene_patchscopes.load_sweep(folder.path, lazy=True)`; removed in 0.3.0."""
        _deprecated("SweepFolder.dataset()", "pyvene_patchscopes.load_sweep(folder.path, lazy=True)")
        from ..execution.sweeps import load_sweep

        return load_sweep(self.path, lazy=True)


def top_texts(tokenizer: Any, ids: torch.Tensor) -> list[str]:
    """Token texts of `ids` (any shape, flattened), each distinct id decoded once."""
    flat = ids.reshape(-1).tolist()
    text = {i: token_text(tokenizer, i) for i in set(flat)}
    return [text[i] for i in flat]


def _position_of(field: str, layer: int, layers: list[int]) -> int:
    """Where `layer` is in a sweep's layers, as it was given (-1 is not 29), else one line naming them."""
    if layer not in layers:
        raise SpecError(f"{field}={layer!r} is not among this sweep's layers (allowed: {', '.join(map(str, layers))})")
    return layers.index(layer)


__all__ = ["SweepResult", "SweepFolder", "top_texts"]
