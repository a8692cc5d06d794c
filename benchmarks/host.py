"""Benchmark: host work per sweep cell (what the CPU does besides the model), before and after issue 25, in one process.

Before, every unit of source prompts resolved every (l, l*) cell again (building and validating its spec,
tokenizing both prompts) and rebuilt f, and ``to_records`` built a `PatchscopeResult` per cell. Now the cells are
resolved and f built once per sweep, and ``to_records`` reads the tensors column-wise. "Before" runs the same
code with those two caches switched off and the old ``to_records``, so both sides share everything else.

Host time is the time spent in that work (resolving cells and source prompts, building f, building records),
timed by wrapping those functions, on SmolLM2 over its 30 x 30 grid; the model's own work is reported beside it.
Units of one prompt (``batch_size=1``) make the per-unit work visible, as on a GPU, where a 7B model's unit
takes about as long as the host's seconds per 30 x 30 unit used to.

    python benchmarks/host.py --prompts 8 --out benchmarks/results/host.json
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sweep import prompts_benchmark, write_report  # noqa: E402

sweeping = importlib.import_module("pyvene_patchscopes.execution.sweeps")  # the module (the package exports a function)
grids = importlib.import_module("pyvene_patchscopes.plan.grid")  # resolve is looked up here (cells) ...
units = importlib.import_module("pyvene_patchscopes.execution.sweep_units")  # ... and here (each prompt's source)


def old_records(grid) -> list[dict]:
    """``to_records`` as it was: one `PatchscopeResult` per cell, then a dict from it."""
    return [
        {
            "prompt": r.scope.source.prompt,
            "source_layer": r.scope.source.layer,
            "target_layer": r.scope.target.layer,
            "source_position": r.source_position,
            "token": r.token,
            "prob": r.prob,
            "generation": r.generation,
            "informative": r.informative,
        }
        for r in grid.results
    ]


class Uncached(sweeping.Grid):
    """The sweep as before: every unit resolves every cell again and builds f again."""

    def cells(self, prompt):
        self._cells = None
        return super().cells(prompt)

    def mapping(self, spec, source, target):
        self._mappings.clear()
        return super().mapping(spec, source, target)


class Clock:
    """Seconds spent inside the wrapped host functions (not counting a wrapped call made inside another)."""

    def __init__(self) -> None:
        self.seconds, self.depth = 0.0, 0

    def wrap(self, function):
        def timed(*args, **kwargs):
            self.depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - start

        return timed


def timed(handle, prompts, before: bool) -> tuple[float, float, float, object]:
    """(host seconds in the sweep, seconds of the sweep, seconds of to_records, (grid, records))."""
    clock = Clock()
    saved = sweeping.Grid, grids.resolve, units.resolve
    grid_class = Uncached if before else sweeping.Grid

    class Timed(grid_class):
        cells = clock.wrap(grid_class.cells)
        mapping = clock.wrap(grid_class.mapping)

    sweeping.Grid, grids.resolve, units.resolve = Timed, clock.wrap(grids.resolve), clock.wrap(units.resolve)
    try:
        start = time.perf_counter()
        grid = sweeping.sweep(prompts, handle, max_new_tokens=0, progress=False, batch_size=1, top=1)
        swept = time.perf_counter() - start
    finally:
        sweeping.Grid, grids.resolve, units.resolve = saved
    start = time.perf_counter()
    records = old_records(grid) if before else grid.to_records()
    return clock.seconds, swept, time.perf_counter() - start, (grid, records)


def main(argv: list[str] | None = None) -> int:
    args, handle, prompts = prompts_benchmark(__doc__, argv, 8, 3, "source prompts, one unit each")
    cells = args.prompts * handle.n_layers**2
    timed(handle, prompts[:1], False)  # warm-up: the runner's probe, first calls
    best = {before: [float("inf")] * 3 for before in (True, False)}
    kept = {}
    for _ in range(args.repeats):
        for before in (True, False):
            *seconds, kept[before] = timed(handle, prompts, before)
            best[before] = [min(a, b) for a, b in zip(best[before], seconds)]
    (grid_before, rec_before), (grid_after, rec_after) = kept[True], kept[False]
    same = torch.equal(grid_before.top_ids, grid_after.top_ids) and rec_before == rec_after

    def ms(seconds: float) -> float:
        return round(1000 * seconds / cells, 4)

    def side(before: bool) -> dict[str, float]:
        return {
            "resolve_and_f": ms(best[before][0]),
            "to_records": ms(best[before][2]),
            "host": ms(best[before][0] + best[before][2]),
            "sweep_wall": ms(best[before][1]),
        }

    report = {
        "model": args.model,
        "grid": f"{handle.n_layers} x {handle.n_layers}",
        "prompts": args.prompts,
        "cells": cells,
        "units": args.prompts,
        "repeats": args.repeats,
        "ms_per_cell": {"before": side(True), "after": side(False)},
        "host_speedup": round((best[True][0] + best[True][2]) / (best[False][0] + best[False][2]), 1),
        "identical_results": same,
    }
    print(
        f"ms per cell: before {report['ms_per_cell']['before']}, after {report['ms_per_cell']['after']}; "
        f"host x{report['host_speedup']}; identical: {same}"
    )
    write_report(args.out, report)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
