"""Benchmark: verifying the demo grid's readings, against the sweep itself and a loop of one hooked forward per text.

The grid is the demo's: "CEO" in "Amazon's former CEO attended Oscars" read by token identity at every source
layer of SmolLM2 with l* = l (30 cells). `verify` checks each cell's reading with 32 controls and the self-check:
34 texts put back per cell. It is timed on the planned execution and on the plain pyvene path. The baseline is what
a user writes without this library: one forward per text to read its carrier state (all layers at once), then, per
cell and text, a forward hook on block l (the final norm at the last layer) that writes the state at (S, i) and one
forward of S. Everything runs in this process, each side after one warm-up; the report gives the times, verify's
cost as a share of the sweep's, the speedup over the loop, cells per second, and how far the three agree on D.
It also verifies the demo's whole l x l* grid (900 cells), where the controls of one l serve all 30 l*, against that
sweep.

    python benchmarks/verify.py --out benchmarks/results/verify.json
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sweep import write_report  # noqa: E402

from pyvene_patchscopes import VerifySettings, load_model, sweep, verify  # noqa: E402
from pyvene_patchscopes.execution.verify import carried, control_words  # noqa: E402

PROMPT, POSITION = "Amazon's former CEO attended Oscars", "CEO"


def timed(call, repeats: int):
    """The best of `repeats` timed calls after one warm-up, and the last call's value."""
    value = call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        value = call()
        best = min(best, time.perf_counter() - start)
    return best, value


def hooked_loop(handle, grid, settings: VerifySettings) -> list[list[float]]:
    """The baseline: per cell, D of every text (controls, reading, the source token) by one hooked forward each."""
    model, tok = handle.model, handle.tokenizer
    blocks, norm = model.model.layers, model.model.norm  # SmolLM2 is a Llama
    n = len(blocks)
    controls = control_words(handle, settings)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    found = []
    with torch.no_grad():
        original = torch.log_softmax(model(ids).logits[0].float(), -1)
        states = {}  # text -> its carrier state at every layer (HF's hidden_states[l + 1])

        def state(text: str) -> torch.Tensor:
            if text not in states:
                where = carried(tok, settings.carrier, text, "text")
                hidden = model(tok(where.prompt, return_tensors="pt")["input_ids"], output_hidden_states=True)
                states[text] = torch.stack([h[0, where.last] for h in hidden.hidden_states[1:]])
            return states[text]

        for cell, layer in zip(grid.results, grid.source_layers):
            position = cell.source_position
            own = tok.decode(ids[0, position])
            d = []
            for text in [*controls, cell.top[0].token, own]:
                vector = state(text)[layer]

                def write(module, args, out, vector=vector, position=position):
                    hidden = out[0] if isinstance(out, tuple) else out
                    hidden[0, position] = vector
                    return out

                hook = (norm if layer == n - 1 else blocks[layer]).register_forward_hook(write)
                try:
                    patched = torch.log_softmax(model(ids).logits[0].float(), -1)
                finally:
                    hook.remove()
                kl = (original.exp() * (original - patched)).sum(-1)[position:].mean()
                d.append(float(kl))
            found.append(d)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    handle = load_model("smollm2-135m")
    settings = VerifySettings()

    def grid_of():
        return sweep(PROMPT, handle, preset="token-identity", source_position=POSITION, target_layers="same")

    sweep_s, grid = timed(grid_of, args.repeats)
    verify_s, planned = timed(lambda: verify(grid, handle, settings), args.repeats)
    plain_s, plain = timed(lambda: verify(grid, handle, settings, planned=False), args.repeats)
    start = time.perf_counter()
    loop = hooked_loop(handle, grid, settings)
    loop_s = time.perf_counter() - start
    cells = len(grid.results)
    texts = len(control_words(handle, settings)) + 2

    def engine_d(checks) -> list[list[float]]:  # each cell's controls, then its reading (the loop's order)
        return [[*c.controls.values(), c.disruption] for c in checks]

    full_s, full = timed(lambda: sweep(PROMPT, handle, preset="token-identity", source_position=POSITION), 1)
    full_verify_s, _ = timed(lambda: verify(full, handle, settings), 1)
    agree = max(abs(a - b) for x, y in zip(engine_d(planned), loop) for a, b in zip(x, y))
    agree_plain = max(abs(a - b) for x, y in zip(engine_d(planned), engine_d(plain)) for a, b in zip(x, y))
    report = {
        "model": handle.name,
        "prompt": PROMPT,
        "position": POSITION,
        "cells": cells,
        "controls": settings.controls,
        "texts_per_cell": texts,
        "threads": torch.get_num_threads(),
        "sweep_s": round(sweep_s, 3),
        "verify_s": round(verify_s, 3),
        "verify_plain_s": round(plain_s, 3),
        "hooked_loop_s": round(loop_s, 3),
        "verify_over_sweep": round(verify_s / sweep_s, 2),
        "speedup_over_loop": round(loop_s / verify_s, 2),
        "speedup_over_plain": round(plain_s / verify_s, 2),
        "verify_cells_per_s": round(cells / verify_s, 2),
        "loop_cells_per_s": round(cells / loop_s, 2),
        "max_d_difference_loop": agree,
        "max_d_difference_plain": agree_plain,
        "full_grid_cells": len(full.results),
        "full_sweep_s": round(full_s, 3),
        "full_verify_s": round(full_verify_s, 3),
        "full_verify_over_sweep": round(full_verify_s / full_s, 2),
        "full_verify_cells_per_s": round(len(full.results) / full_verify_s, 2),
        "verdicts": [c.verdict for c in planned],
        "date": datetime.date.today().isoformat(),
    }
    for key, value in report.items():
        if key != "verdicts":
            print(f"{key}: {value}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
