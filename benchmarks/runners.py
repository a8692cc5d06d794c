"""Benchmark: the three planned runners and the plain pyvene path on the same l x l* grid, in one process.

Every runner is exact (each family is held to hand-written hooks), so what differs is only the work each does:

  shared prefix  (`execution/stack.py`)    the target's prefix once; rows run the suffix from their l* up
  shared layers  (`execution/layered.py`)  the target's blocks below l* once; rows run the whole prompt above
  own forward    (`execution/replayed.py`) the model's own forward, blocks below the batch's lowest l* replayed
  plain          the plain pyvene path (one batched pyvene call per target layer)

On SmolLM2 (which takes the shared prefix) each runner is forced in turn by pointing `sweep`'s runner choice at
it, so the rates compare like with like; a family whose shared prefix cannot be exact gets the second or
third. Reported: cells per second, the ratio to the plain path, and top-1 agreement with the shared prefix.

    python benchmarks/runners.py --prompts 2 --out benchmarks/results/runners.json
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from pyvene_patchscopes import load_model
from pyvene_patchscopes.execution.layered import Layered
from pyvene_patchscopes.execution.replayed import Replayed
from pyvene_patchscopes.execution.stack import Stack
from pyvene_patchscopes.models.architectures import architecture

sys.path.insert(0, str(Path(__file__).parent))
from sweep import source_prompts, write_report  # noqa: E402  (the same prompts as benchmarks/sweep.py)

# the module (the package exports its function of the same name)
sweeping = importlib.import_module("pyvene_patchscopes.execution.sweeps")
units = importlib.import_module("pyvene_patchscopes.execution.sweep_units")  # where a unit looks up stack_for
RUNNERS = {"shared prefix": Stack, "shared layers": Layered, "own forward": Replayed}


def grid(handle, prompts: list[str], runner: type[Stack] | None, max_batch_tokens: int):
    """The l x l* token-identity grid, top-1 only, by `runner` (None: the plain pyvene path)."""
    chosen = units.stack_for
    if runner is not None:
        units.stack_for = lambda model: runner(model, architecture(model))
    try:
        return sweeping.sweep(
            prompts,
            handle,
            max_new_tokens=0,
            keep_logits=False,
            progress=False,
            top=1,
            planned=runner is not None,
            max_batch_tokens=max_batch_tokens,
        )
    finally:
        units.stack_for = chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=2, help="source prompts of the l x l* grid")
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    handle = load_model(args.model)
    prompts = source_prompts(args.prompts)
    cells = args.prompts * handle.n_layers**2
    rows: dict[str, dict[str, Any]] = {}
    reference = None
    for name, runner in [*RUNNERS.items(), ("plain", None)]:
        grid(handle, prompts[:1], runner, args.max_batch_tokens)  # warm-up: allocator, kernels
        start = time.perf_counter()
        result = grid(handle, prompts, runner, args.max_batch_tokens)
        seconds = time.perf_counter() - start
        top1 = result.top_ids[..., 0]
        reference = top1 if reference is None else reference
        rows[name] = {
            "seconds": seconds,
            "cells_per_s": cells / seconds,
            "top1_agreement_with_shared_prefix": float((top1 == reference).float().mean()),
        }
    for row in rows.values():
        row["over_plain"] = row["cells_per_s"] / rows["plain"]["cells_per_s"]
    lines = ["| runner | cells/s | x plain | top-1 = shared prefix |", "|---|---|---|---|"]
    lines += [
        f"| {name} | {r['cells_per_s']:.0f} | {r['over_plain']:.1f} | {r['top1_agreement_with_shared_prefix']:.3f} |"
        for name, r in rows.items()
    ]
    print(
        "\n".join(lines) + f"\n\n{handle.name}, {args.prompts} prompts x {handle.n_layers} x {handle.n_layers} "
        f"= {cells} cells, cpu, {torch.get_num_threads()} threads"
    )
    write_report(
        args.out,
        {
            "model": handle.name,
            "prompts": args.prompts,
            "cells": cells,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "runners": rows,
            "command": " ".join(["runners.py"] + (argv if argv is not None else sys.argv[1:])),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
