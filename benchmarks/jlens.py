"""Benchmark: the Jacobian lens against the reference fit in TransformerLens 4.3, and against the logit lens and the
tuned lens on the next-token evaluation, on SmolLM2-135M.

1. Cross-check. `jlens.fit_jacobian_lens` and TransformerLens's `JacobianLens.fit` (run in `.venv-tl` by
   `jlens_tl.py`, on a raw `TransformerBridge` booted on the same model, with the same token ids checked) fit J_l
   on the same prompts at the same layers and settings. This package reads TransformerLens's saved file with
   `JacobianLens.from_file`. Reported per layer: the largest entry-wise difference relative to the largest entry of
   TransformerLens's J_l, the relative Frobenius difference, and the top-1 agreement of the two readouts
   W_U·norm(J_l h_l) on the 100 evaluation prefixes of `patchscopes eval next-token`.
2. Next-token. The shipped J-lens (the catalogue's ``jacobian-lens-lNN``, fitted on 48 texts of the next-token
   train split) against the logit lens and a tuned lens fitted on the whole train split (250 texts, as `patchscopes
   eval next-token` fits it), on the same evaluation prefixes: Precision@1 against the model's own next token, with
   95% bootstrap intervals and exact McNemar tests on the same prefixes.

    make bench-jlens    # python benchmarks/jlens.py --prompts 4 --out benchmarks/results/jlens.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pyvene_patchscopes.catalogue.build import JACOBIAN_LENS_TOKENS, jacobian_lens_texts  # noqa: E402
from sweep import write_report  # noqa: E402

from pyvene_patchscopes import hidden_states, load_model  # noqa: E402
from pyvene_patchscopes.analysis.fit import fit_tuned_lens  # noqa: E402
from pyvene_patchscopes.evaluate.common import lens_logits, sample_prefixes  # noqa: E402
from pyvene_patchscopes.evaluate.data import prose_splits  # noqa: E402
from pyvene_patchscopes.evaluate.scoring import precision_at_1  # noqa: E402
from pyvene_patchscopes.evaluate.stats import bootstrap, paired  # noqa: E402
from pyvene_patchscopes.jlens import JacobianLens, fit_jacobian_lens  # noqa: E402
from pyvene_patchscopes.spec.layers import parse_layers  # noqa: E402

HERE = Path(__file__).resolve().parent


def readout(handle, lens: JacobianLens | None, layer: int, states: torch.Tensor) -> torch.Tensor:
    """W_U · norm(J_l h_l) for each row of `states` (J = I without a lens)."""
    moved = states if lens is None else states.float() @ lens.jacobians[layer].T
    return lens_logits(handle, moved)


def crosscheck(
    handle, texts: list[str], layers: list[int], tl_python: str, states: dict[int, torch.Tensor], dim_batch: int
) -> dict:
    start = time.perf_counter()
    ours = fit_jacobian_lens(
        texts, handle, layers, dim_batch=dim_batch, max_seq_len=JACOBIAN_LENS_TOKENS, progress=True
    )
    ours_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "texts.json").write_text(json.dumps(texts))
        done = subprocess.run(
            [
                tl_python,
                str(HERE / "jlens_tl.py"),
                "--texts",
                str(Path(tmp) / "texts.json"),
                "--layers",
                ",".join(map(str, layers)),
                "--max-seq-len",
                str(JACOBIAN_LENS_TOKENS),
                "--dim-batch",
                str(dim_batch),
                "--out",
                str(Path(tmp) / "tl.pt"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"the TransformerLens side failed:\n{done.stderr[-3000:]}")
        theirs_run = json.loads(done.stdout.strip().splitlines()[-1])
        theirs = JacobianLens.from_file(Path(tmp) / "tl.pt", model=handle)  # TransformerLens's file, our reader
    per_layer = {}
    for layer in layers:
        a, b = ours.jacobians[layer], theirs.jacobians[layer]
        top_a = readout(handle, ours, layer, states[layer]).argmax(-1)
        top_b = readout(handle, theirs, layer, states[layer]).argmax(-1)
        per_layer[str(layer)] = {
            "max_abs_diff_over_max_abs": float((a - b).abs().max() / b.abs().max()),
            "frobenius_relative": float(torch.linalg.norm(a - b) / torch.linalg.norm(b)),
            "top1_agreement": float((top_a == top_b).float().mean()),
        }
    worst = max(v["max_abs_diff_over_max_abs"] for v in per_layer.values())
    return {
        "prompts": len(texts),
        "tokens_per_prompt": JACOBIAN_LENS_TOKENS,
        "layers": layers,
        "transformer_lens": theirs_run["transformer_lens"],
        "n_prompts": [ours.n_prompts, theirs.n_prompts],
        "seconds": {"pyvene_patchscopes": round(ours_seconds, 1), "transformer_lens": round(theirs_run["seconds"], 1)},
        "largest_relative_difference": worst,
        "largest_frobenius_relative": max(v["frobenius_relative"] for v in per_layer.values()),
        "smallest_top1_agreement": min(v["top1_agreement"] for v in per_layer.values()),
        "per_layer": per_layer,
    }


def next_token(handle, states: dict[int, torch.Tensor], train: list[str], seed: int = 0) -> dict:
    lens = JacobianLens.from_catalogue(model=handle)
    layers, last = lens.source_layers, handle.n_layers - 1
    reference = lens_logits(handle, states[last], normalised=True)  # the model's own next-token logits
    tuned = fit_tuned_lens(train, handle, layers, progress=True)
    hits = {}
    for layer in layers:
        logits = {
            "logit lens": readout(handle, None, layer, states[layer]),
            "tuned lens": lens_logits(handle, tuned[layer](states[layer])),
            "jacobian lens": readout(handle, lens, layer, states[layer]),
        }
        hits[layer] = {name: precision_at_1(value, reference).tolist() for name, value in logits.items()}
    table = {}
    for layer in layers:
        row = {name: bootstrap(h, seed).to_dict() for name, h in hits[layer].items()}
        for other in ("logit lens", "tuned lens"):
            row[f"jacobian lens - {other}"] = paired(
                hits[layer]["jacobian lens"], hits[layer][other], ("jacobian lens", other), seed
            ).to_dict()
        table[str(layer)] = row
    return {
        "evaluation_prefixes": len(reference),
        "jacobian_lens_prompts": lens.n_prompts,
        "tuned_lens_training_texts": len(train),
        "precision_at_1": table,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="cross-check prompts (each fit costs ~1 min/prompt)")
    parser.add_argument("--layers", default="0-28", help="cross-check source layers: 0-28 or 6,12,18,24")
    parser.add_argument("--dim-batch", type=int, default=64)
    parser.add_argument("--tl-python", default=str(HERE.parent / ".venv-tl" / "bin" / "python"))
    parser.add_argument("--skip-crosscheck", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    handle = load_model("smollm2-135m")
    layers = parse_layers(args.layers, handle.n_layers - 1, "--layers")  # source layers: all but the last
    splits = prose_splits(250, 100, 0)  # patchscopes eval next-token's default split
    prefixes = sample_prefixes(handle, splits["evaluation"]["text"], 0)
    read = sorted({*layers, 6, 12, 18, 24, handle.n_layers - 1})
    states = dict(zip(read, hidden_states(prefixes, handle, read).unbind(1)))
    report = {"model": handle.name, "device": "cpu", "torch_threads": torch.get_num_threads()}
    if not args.skip_crosscheck:
        report["crosscheck"] = crosscheck(
            handle, jacobian_lens_texts()[: args.prompts], layers, args.tl_python, states, args.dim_batch
        )
        print(json.dumps({k: v for k, v in report["crosscheck"].items() if k != "per_layer"}, indent=2))
    report["next_token"] = next_token(handle, states, list(splits["train"]["text"]))
    for layer, row in report["next_token"]["precision_at_1"].items():
        print(
            layer,
            {
                k: (round(v["estimate"], 3), round(v["low"], 3), round(v["high"], 3))
                for k, v in row.items()
                if "estimate" in v
            },
        )
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
