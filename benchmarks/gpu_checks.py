"""GPU checks for split and offloaded models (run by benchmarks/gpu.sh; needs CUDA, never run by CI).

1. two devices (when two are present): SmolLM2 split over cuda:0 and cuda:1 by ``device_map`` answers exactly as
   the model on cuda:0 (run and sweep on both paths, generation, Jacobian Scopes);
2. offloaded: the embedding and head offloaded to the CPU, layers 10-13 to disk, the rest on cuda:0: equal too;
3. peak GPU memory of a streamed bf16 sweep of 512 prompts, written to a folder.

Equality is checked in fp32; exact on one device, and within 1e-4 in logits across devices (cuBLAS may pick
other kernels on another device).

    python benchmarks/gpu_checks.py --out benchmarks/results/gpu_checks.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sweep import source_prompts, write_report  # noqa: E402

from pyvene_patchscopes import build, jacobian_scope, load_model, run, sweep  # noqa: E402

PROMPT = "Amazon's former CEO attended Oscars"


def readouts(handle) -> dict[str, torch.Tensor | list]:
    out: dict[str, torch.Tensor | list] = {}
    scopes = [build("token-identity", PROMPT, 4, layer) for layer in (3, 12, 20)]
    for planned in (True, False):
        out[f"run planned={planned}"] = torch.stack([r.logits for r in run(scopes, handle, planned=planned)]).cpu()
        grid = sweep(
            [PROMPT, "The city of Paris"],
            handle,
            source_layers=[2, 12],
            target_layers=[1, 12, 29],
            max_new_tokens=4,
            planned=planned,
            progress=False,
            keep_logits=True,
        )
        out[f"sweep planned={planned}"] = grid.logits.cpu()
        out[f"generations planned={planned}"] = grid.generations
    out["jacobian fisher"] = torch.tensor(jacobian_scope("The Eiffel Tower is in the city of", handle, "fisher").scores)
    return out


def compare(want: dict, got: dict) -> dict[str, float | bool]:
    return {
        key: (want[key] == got[key]) if isinstance(want[key], list) else float((want[key] - got[key]).abs().max())
        for key in want
    }


def layout(ends: str, middle: str, split: str | None = None) -> dict[str, str]:
    where = {"model.embed_tokens": ends, "model.rotary_emb": "cuda:0", "model.norm": split or "cuda:0", "lm_head": ends}
    for i in range(30):
        where[f"model.layers.{i}"] = middle if 10 <= i < 14 else (split if split and i >= 15 else "cuda:0")
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    report: dict[str, object] = {"devices": torch.cuda.device_count(), "gpu": torch.cuda.get_device_name(0)}
    reference = readouts(load_model("smollm2-135m", device="cuda:0"))
    if torch.cuda.device_count() >= 2:
        split = load_model("smollm2-135m", device_map=layout("cuda:0", "cuda:0", split="cuda:1"))
        report["two_devices"] = compare(reference, readouts(split))
        del split
    with tempfile.TemporaryDirectory() as folder:
        offloaded = load_model("smollm2-135m", device_map=layout("cpu", "disk"), offload_folder=folder)
        report["offloaded"] = compare(reference, readouts(offloaded))
        del offloaded
    torch.cuda.empty_cache()
    handle = load_model("smollm2-135m", device="cuda", dtype="bfloat16")
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        sweep(
            source_prompts(512),
            handle,
            target_layers="same",
            max_new_tokens=0,
            batch_size=512,
            progress=False,
            max_batch_tokens=1048576,
            out=Path(folder) / "s",
        )
        report["streamed_sweep_512"] = {
            "seconds": round(time.perf_counter() - start, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        }
    print(report)
    write_report(args.out, report)
    worst = [v for part in ("two_devices", "offloaded") for v in dict(report.get(part, {})).values()]
    return 0 if all((v is True) or (not isinstance(v, bool) and v <= 1e-4) for v in worst) else 1


if __name__ == "__main__":
    raise SystemExit(main())
