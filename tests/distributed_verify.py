"""Run by tests/test_sweep_verify.py under `accelerate launch` with 2 CPU processes: a verified sweep on a tiny model,
one prompt a unit; rank 0 writes the merged checks (each process checked its own units)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_sweep_verify import GRID, PROMPTS, TINY  # noqa: E402
from tiny import tiny_model  # noqa: E402

from pyvene_patchscopes.execution.distributed import state  # noqa: E402
from pyvene_patchscopes.execution.sweeps import sweep  # noqa: E402


def run_sweep(handle):
    return sweep(PROMPTS, handle, verify=TINY, batch_size=1, **GRID)


def main(out: str) -> None:
    process = state()
    grid = run_sweep(tiny_model("llama", seed=5))
    if process.is_main_process:
        Path(out, "checks.json").write_text(json.dumps([check.to_dict() for check in grid.verifications]))
    process.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
