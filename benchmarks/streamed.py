"""Benchmark, in one process: a streamed sweep (``out=`` a folder, units by `UNIT_CELLS`) against it in memory.

A streamed sweep cuts its prompts into small units, so that a kill loses little (on SmolLM2: one prompt a unit of
the 30 x 30 grid, 8 at l* = l), and writes each unit as a Parquet shard; the in-memory sweep takes 32 prompts a
unit and writes nothing. Both run with every setting at its default but ``max_new_tokens=0`` (the next token) on
the same prompts; the report gives each side's best wall time over the repeats, their ratio (streamed / in
memory), and how far the folder read back agrees with the in-memory result: the same top-1 token in every cell,
and probabilities within float rounding (units of other sizes batch the rows otherwise; the same units give the
same bits, which tests/test_sweep_folder.py checks).

A third pair times the logit lens, whose cells run through `run` in forward batches: the streamed sweep as it is
(32 rows a forward pass, as in memory) against the same sweep with a unit's prompts as its forward batch (8),
as it was before the two were kept apart.

    python benchmarks/streamed.py --prompts 8 --out benchmarks/results/streamed.json
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sweep import prompts_benchmark, write_report  # noqa: E402

from pyvene_patchscopes import SweepResult, load_sweep  # noqa: E402

sweeping = importlib.import_module("pyvene_patchscopes.execution.sweeps")


class UnitBatched(sweeping.Grid):
    """The grid as before the review of issue 36: a streamed unit's prompts were also its forward batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forward_batch = self.prompts_per_unit


def streamed(handle, prompts: list[str], unit_batched: bool = False, **settings: Any) -> tuple[float, Any]:
    """(seconds, the folder read back) of the sweep written to a fresh folder."""
    saved = sweeping.Grid
    sweeping.Grid = UnitBatched if unit_batched else saved
    try:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            done = sweeping.sweep(prompts, handle, out=Path(folder) / "sweep", **settings)
            seconds = time.perf_counter() - start
            return seconds, (done.manifest["batch_size"], load_sweep(done.path))
    finally:
        sweeping.Grid = saved


def in_memory(handle, prompts: list[str], **settings: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    grid = sweeping.sweep(prompts, handle, **settings)
    return time.perf_counter() - start, grid


def best(repeats: int, sides: dict[str, Callable[[], tuple[float, Any]]]) -> tuple[dict[str, float], dict[str, Any]]:
    """Each side's best seconds over `repeats`, the sides alternating so that drift reaches both alike."""
    seconds = {name: float("inf") for name in sides}
    kept = {}
    for _ in range(repeats):
        for name, side in sides.items():
            took, kept[name] = side()
            seconds[name] = min(seconds[name], took)
    return seconds, kept


TOLERANCE = 1e-3  # probabilities of the same cells batched in other units differ by float rounding only


def agreement(loaded: SweepResult, grid: SweepResult) -> dict[str, Any]:
    """Whether two sweeps of the same cells agree: every top-1 token, and the largest difference in probability."""
    top1 = loaded.prompts == grid.prompts and torch.equal(loaded.top_ids[..., 0], grid.top_ids[..., 0])
    return {"top1_equal": top1, "max_prob_difference": float((loaded.top_probs - grid.top_probs).abs().max())}


def agrees(row: dict[str, Any]) -> bool:
    return row["top1_equal"] and row["max_prob_difference"] < TOLERANCE


def main(argv: list[str] | None = None) -> int:
    args, handle, prompts = prompts_benchmark(__doc__, argv, 8, 2)
    common = dict(max_new_tokens=0, progress=False)
    in_memory(handle, prompts[:1], target_layers="same", **common)  # warm-up: the runner's probe, first calls
    report: dict[str, Any] = {
        "model": args.model,
        "prompts": args.prompts,
        "repeats": args.repeats,
        "max_new_tokens": 0,
        "sweeps": {},
    }
    agree = True
    for name, settings in (("grid", {}), ("same", {"target_layers": "same"})):
        settings = {**common, **settings}
        seconds, kept = best(
            args.repeats,
            {
                "streamed": lambda s=settings: streamed(handle, prompts, **s),
                "in_memory": lambda s=settings: in_memory(handle, prompts, **s),
            },
        )
        (per_unit, loaded), grid = kept["streamed"], kept["in_memory"]
        report["sweeps"][name] = {
            "cells": grid.top_ids.shape[:3].numel(),
            "streamed_prompts_per_unit": per_unit,
            "streamed_s": round(seconds["streamed"], 3),
            "in_memory_s": round(seconds["in_memory"], 3),
            "ratio": round(seconds["streamed"] / seconds["in_memory"], 2),
            **agreement(loaded, grid),
        }
        agree &= agrees(report["sweeps"][name])
    lens = {**common, "preset": "logit-lens"}
    seconds, kept = best(
        args.repeats,
        {
            "forward_32": lambda: streamed(handle, prompts, **lens),
            "forward_unit": lambda: streamed(handle, prompts, True, **lens),
        },
    )
    report["logit_lens_streamed"] = {
        "cells": kept["forward_32"][1].top_ids.shape[:3].numel(),
        "prompts_per_unit": kept["forward_32"][0],
        "forward_32_s": round(seconds["forward_32"], 3),
        "forward_unit_s": round(seconds["forward_unit"], 3),
        "speedup": round(seconds["forward_unit"] / seconds["forward_32"], 2),
        **agreement(kept["forward_32"][1], kept["forward_unit"][1]),
    }
    report["agree"] = agree and agrees(report["logit_lens_streamed"])
    print(summary(report))
    write_report(args.out, report)
    return 0 if report["agree"] else 1


def summary(report: dict[str, Any]) -> str:
    """The report in a few lines: each pair's seconds and ratio, and whether the results agree."""
    lines = [
        f"{name}: streamed {row['streamed_s']} s ({row['streamed_prompts_per_unit']} prompt(s) a unit), in "
        f"memory {row['in_memory_s']} s: x{row['ratio']}"
        for name, row in report["sweeps"].items()
    ]
    lens = report["logit_lens_streamed"]
    lines.append(
        f"logit lens streamed: forward batch 32 {lens['forward_32_s']} s, the unit's "
        f"{lens['forward_unit_s']} s; results agree: {report['agree']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
