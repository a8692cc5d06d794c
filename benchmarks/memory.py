"""Benchmark: peak memory against sweep size, on both embedded models; flat in the number of prompts when streamed.

Each measurement is its own process (so its peak resident memory is its own): it loads the model, builds N
source prompts as a `datasets` column, and sweeps token identity at l* = l over every layer (next token).

- ``folder``: ``sweep(column, out=folder)``, the default readout (top-10 per cell): prompts are read a unit at
  a time and each unit is written as a Parquet shard, so nothing grows with N;
- ``memory+logits``: the in-memory sweep keeping full logits (``keep_logits=True``, the old default), for
  contrast at the sizes where it fits: it grows by N x layers x vocabulary x 4 bytes.

    python benchmarks/memory.py --limit 10000 --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sweep import write_report  # noqa: E402

SIZES = (250, 1000, 2500, 10000)
CONTRAST = (250, 1000)  # in memory with full logits: 12 GB at 1,000 prompts on SmolLM2
# a contrast run whose logits (twice: the parts and their concatenation) would pass this is left out
CONTRAST_LIMIT_GIB = 12
VOCAB = {"smollm2-135m": (30, 49152), "gemma3-270m": (18, 262144)}


def prompts(n: int) -> list[str]:
    """N distinct prose snippets (6 to 14 words) from the English text that ships with Python."""
    from pyvene_patchscopes.analysis.fit import default_texts

    words = " ".join(default_texts()).split()
    out = [" ".join(words[start : start + 6 + start % 9]) for start in range(0, len(words) - 16, 2)]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} prompts available (asked for {n})")
    return out[:n]


def measure(model: str, n: int, mode: str, batch_size: int) -> dict:
    """In this process: one sweep; its seconds and this process's peak resident memory."""
    import warnings

    import datasets

    from pyvene_patchscopes import load_model, sweep

    warnings.simplefilter("ignore")
    handle = load_model(model)
    column = datasets.Dataset.from_dict({"text": prompts(n)})["text"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        if mode == "folder":
            done = sweep(
                column,
                handle,
                target_layers="same",
                max_new_tokens=0,
                batch_size=batch_size,
                progress=False,
                out=Path(folder) / "sweep",
            )
            cells = len(list((Path(folder) / "sweep").glob("unit-*.parquet")))
        else:
            done = sweep(
                list(column),
                handle,
                target_layers="same",
                max_new_tokens=0,
                batch_size=batch_size,
                progress=False,
                keep_logits=True,
            )
            cells = int(done.top_ids[..., 0].numel())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "model": model,
        "prompts": n,
        "mode": mode,
        "layers": handle.n_layers,
        "cells": n * handle.n_layers,
        "shards_or_cells": cells,
        "seconds": round(seconds, 1),
        "cells_per_s": round(n * handle.n_layers / seconds, 1),
        "peak_rss_gib": round(peak, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--limit", type=int, default=10000, help="the largest N (sizes above it are left out)")
    parser.add_argument("--second-model-limit", type=int, default=2500, help="the largest N for the other models")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.one[2], args.batch_size)))
        return 0
    rows = []
    for k, model in enumerate(args.models.split(",")):
        limit = args.limit if k == 0 else min(args.limit, args.second_model_limit)
        layers, vocab = VOCAB.get(model, (32, 128256))
        fits = lambda n, layers=layers, vocab=vocab: 2 * n * layers * vocab * 4 / 2**30 <= CONTRAST_LIMIT_GIB  # noqa: E731
        runs = [(n, "folder") for n in SIZES if n <= limit] + [
            (n, "memory+logits") for n in CONTRAST if n <= limit and fits(n)
        ]
        for n, mode in runs:
            done = subprocess.run(
                [sys.executable, __file__, "--batch-size", str(args.batch_size), "--one", model, str(n), mode],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    flat = {}
    for model in {r["model"] for r in rows}:
        streamed = [r["peak_rss_gib"] for r in rows if r["model"] == model and r["mode"] == "folder"]
        flat[model] = {
            "smallest_n_gib": streamed[0],
            "largest_n_gib": streamed[-1],
            "growth_gib": round(streamed[-1] - streamed[0], 3),
        }
    write_report(args.out, {"runs": rows, "streamed_peak": flat, "batch_size": args.batch_size})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
