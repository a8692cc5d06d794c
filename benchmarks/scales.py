"""Benchmark: a scale search over many latents as one batched run, against writing the hooks per latent, in one process.

The batched side is `scales.scale_search` on SmolLM2: 100 SAE-like latents (unit directions at layer 6) x 5 scales,
the self-explanation prompt, α·v replacing both X at l* = 6, the next-token readout, self-similarity and entropy.
The baseline is what a user writes without this library: per (latent, α), a forward hook on block l* that writes
α·v at both X, a pre-hook on the final norm that keeps the last block's output at the end of T, and one forward pass
of the prompt; entropy and self-similarity computed the same way. Both sides run in this process on the same
cells; the report gives their rates, the ratio, and how far the two agree (top-1 and the scores).

    python benchmarks/scales.py --latents 100 --out benchmarks/results/scales.json
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sweep import write_report  # noqa: E402

from pyvene_patchscopes import load_model  # noqa: E402
from pyvene_patchscopes.analysis.scales import scale_search  # noqa: E402
from pyvene_patchscopes.models.architectures import architecture  # noqa: E402
from pyvene_patchscopes.presets import SELF_EXPLANATION_PROMPT  # noqa: E402
from pyvene_patchscopes.result import entropy_of  # noqa: E402
from pyvene_patchscopes.spec import Every, VectorSource  # noqa: E402
from pyvene_patchscopes.spec.positions import resolve_slots  # noqa: E402

LAYER = 6
ALPHAS = (8.0, 32.0, 64.0, 128.0, 256.0)


def latents(n: int, width: int) -> torch.Tensor:
    """n unit directions (an SAE's decoder rows are unit-norm), seeded."""
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(n, width, generator=g), dim=-1)


def per_latent_hooks(model, directions: torch.Tensor, alphas, slots: list[int]) -> dict[str, torch.Tensor]:
    """The baseline: one hooked forward pass per (latent, α)."""
    arch = architecture(model.model)
    block = arch.module(model.model, arch.layers)[LAYER]
    norm = arch.module(model.model, arch.final_norm)
    ids = model.tokenizer(SELF_EXPLANATION_PROMPT, return_tensors="pt")
    top, entropy, similarity = [], [], []
    for v in directions:
        for alpha in alphas:
            seen = {}

            def write(module, args, out, v=v, alpha=alpha):
                hidden = out[0] if isinstance(out, tuple) else out
                hidden[0, slots] = alpha * v
                return out

            hooks = [
                block.register_forward_hook(write),
                norm.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(h=args[0][0, -1].clone())),
            ]
            try:
                with torch.no_grad():
                    logits = model.model(**ids, logits_to_keep=1).logits[0, -1]
            finally:
                for hook in hooks:
                    hook.remove()
            top.append(int(logits.argmax()))
            entropy.append(float(entropy_of(logits)))
            similarity.append(float(torch.cosine_similarity(seen["h"], v, dim=0)))
    return {"top": torch.tensor(top), "entropy": torch.tensor(entropy), "self_similarity": torch.tensor(similarity)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m")
    directions = latents(args.latents, model.hidden_size)
    vectors = [VectorSource(d, LAYER, model.name, f"latent-{k}") for k, d in enumerate(directions)]
    slots = list(resolve_slots(model.tokenizer, SELF_EXPLANATION_PROMPT, Every("X")))
    cells = args.latents * len(ALPHAS)

    scale_search(vectors[:2], model, alphas=ALPHAS, layers=[LAYER])  # warm up both sides once
    per_latent_hooks(model, directions[:2], ALPHAS, slots)
    start = time.perf_counter()
    search = scale_search(vectors, model, alphas=ALPHAS, layers=[LAYER])
    batched = time.perf_counter() - start
    start = time.perf_counter()
    base = per_latent_hooks(model, directions, ALPHAS, slots)
    hooks = time.perf_counter() - start

    top = torch.tensor([r.top[0].token_id for r in search.results])
    report = {
        "model": model.name,
        "latents": args.latents,
        "alphas": list(ALPHAS),
        "cells": cells,
        "target_layer": LAYER,
        "prompt": SELF_EXPLANATION_PROMPT,
        "threads": torch.get_num_threads(),
        "batched_s": round(batched, 2),
        "per_latent_hooks_s": round(hooks, 2),
        "batched_cells_per_s": round(cells / batched, 1),
        "hooks_cells_per_s": round(cells / hooks, 1),
        "speedup": round(hooks / batched, 2),
        "top1_agreement": float((top == base["top"]).float().mean()),
        "max_entropy_difference": float((search.entropy.flatten() - base["entropy"]).abs().max()),
        "max_self_similarity_difference": float(
            (search.self_similarity.flatten() - base["self_similarity"]).abs().max()
        ),
        "date": time.strftime("%Y-%m-%d"),
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
