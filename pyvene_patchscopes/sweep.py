"""Sweeps: one call over many source prompts and (source layer, target layer) pairs, as a grid result."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .engine import as_models, run
from .models import ModelHandle
from .presets import get_preset
from .result import PatchscopeResult
from .spec import Position, Source


@dataclass
class SweepResult:
    """Results of a sweep, one per (prompt, source layer, target layer) cell."""

    preset: str
    prompts: list[str]
    source_layers: list[int]
    target_layers: list[int]
    results: list[PatchscopeResult]

    def cell(self, prompt: int, source_layer: int, target_layer: int) -> PatchscopeResult:
        i = self.source_layers.index(source_layer)
        j = self.target_layers.index(target_layer)
        return self.results[(prompt * len(self.source_layers) + i) * len(self.target_layers) + j]

    def to_records(self) -> list[dict[str, Any]]:
        return [{
            "prompt": r.scope.source.prompt, "source_layer": r.scope.source.layer,
            "target_layer": r.scope.target.layer, "source_position": r.source_position,
            "token": r.token, "prob": r.prob, "generation": r.generation,
        } for r in self.results]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame.from_records(self.to_records())

    def plot(self, path: str | Path | None = None, prompt: int = 0):
        """Heatmap of source layer x target layer: colour = top-1 probability, text = top-1 token."""
        from .plot import layer_heatmap

        return layer_heatmap(self, prompt=prompt, path=path)


def sweep(source_prompts: str | Sequence[str], model: ModelHandle | Any, preset: str = "token-identity",
          source_position: Position = -1, source_layers: Sequence[int] | None = None,
          target_layers: Sequence[int] | None = None, progress: bool | None = None, batch_size: int = 32,
          **options: Any) -> SweepResult:
    """Run `preset` for every prompt x source layer x target layer (all layers by default)."""
    prompts = [source_prompts] if isinstance(source_prompts, str) else list(source_prompts)
    models = as_models(model)
    handle = next(iter(models.values()))
    every = list(range(handle.n_layers))
    source_layers = every if source_layers is None else list(source_layers)
    target_layers = every if target_layers is None else list(target_layers)
    build = get_preset(preset).build
    if preset == "logit-lens":
        options.setdefault("tokenizer", handle.tokenizer)
    scopes = [build(Source(p, source_position, l, handle.name), target_layer=t, **options)
              for p in prompts for l in source_layers for t in target_layers]
    results = run(scopes, models, batch_size=batch_size, progress=progress)
    return SweepResult(preset, prompts, source_layers, target_layers, results)
