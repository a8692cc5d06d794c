"""Run by tests/test_sweep_folder.py in a subprocess that the test kills with SIGKILL mid-sweep.

A sweep of a tiny model written to a folder, each unit slowed by a pause after it is computed (before its shard
is written), so that the test can kill the process with some units finished and one in flight. `run` is a sweep
of 12 prompts in units of 2; `run_default` is 20 prompts with the default settings (units by `UNIT_CELLS`) on a
30-layer model, the full 30 x 30 grid or (``"same"``) l* = l.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model  # noqa: E402

module = importlib.import_module("pyvene_patchscopes.execution.sweeps")  # the module (the package exports its function)

PROMPTS = [f"The city of number {i} is large" for i in range(12)]
TWENTY = [f"The city of number {i} is large" for i in range(20)]


def run(folder: str):
    """The sweep both the killed process and the test's own rerun make: same model, prompts and arguments."""
    return module.sweep(
        PROMPTS,
        tiny_model("llama", seed=5),
        target_layers=[0, 2, 3],
        max_new_tokens=2,
        batch_size=2,
        progress=False,
        out=folder,
        readout="logits",
    )


def run_default(folder: str, target_layers: str | None = None):
    """20 prompts, every setting at its default but the layers' (None: the whole grid) and the progress bar."""
    return module.sweep(
        TWENTY, tiny_model("llama", layers=30, seed=5), target_layers=target_layers, progress=False, out=folder
    )


if __name__ == "__main__":
    unit = module.run_unit

    def slow(grid, prompts):
        part = unit(grid, prompts)
        time.sleep(float(sys.argv[2]))
        return part

    module.run_unit = slow
    if len(sys.argv) > 3:  # the default-settings sweep: "grid" or "same"
        run_default(sys.argv[1], None if sys.argv[3] == "grid" else sys.argv[3])
    else:
        run(sys.argv[1])
