"""Run by tests/test_distributed.py under `accelerate launch --cpu --num_processes 2`: a sweep on a tiny model.

Every rank computes its share of the units and gets the merged result; rank 0 writes it (safetensors) and
each rank writes which units it computed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model  # noqa: E402

from pyvene_patchscopes.execution.distributed import my_units, state, world_size  # noqa: E402
from pyvene_patchscopes.execution.sweeps import sweep  # noqa: E402

PROMPTS = [
    "The city of Paris is large",
    "Here is a word: dog",
    "Tokyo London Berlin Rome",
    "one two three four",
    "The capital of France is Paris",
]


def run_sweep(handle):
    return sweep(
        PROMPTS, handle, target_layers=[0, 1, 3], max_new_tokens=3, batch_size=2, progress=False, keep_logits=True
    )


def main(out: str) -> None:
    process = state()
    grid = run_sweep(tiny_model("llama", seed=8))
    folder = Path(out)
    (folder / f"rank{process.process_index}.json").write_text(
        json.dumps(
            {
                "world_size": world_size(),
                "backend": process.backend,
                "units": my_units(3),
                "generations": grid.generations,
            }
        )
    )
    if process.is_main_process:
        save_file(
            {
                "top_ids": grid.top_ids.contiguous(),
                "top_probs": grid.top_probs.contiguous(),
                "logits": grid.logits.contiguous(),
            },
            str(folder / "sweep.safetensors"),
        )
    process.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
