"""The TransformerLens side of the J-lens cross-check (`benchmarks/jlens.py`): run in `.venv-tl`, which has
transformer-lens 4.3 beside this package (`make bench-jlens` makes it; sae-lens in the main environment pins
transformer-lens below 4).

It loads SmolLM2 with this package's `load_model` (the same converted weights and tokenizer), boots a raw
`TransformerBridge` on that very model, checks that the bridge tokenizes every text to the same ids this package
does, fits `transformer_lens.tools.analysis.JacobianLens.fit` (the reference estimator) and saves it with the
bridge's own `save` in float32.

    .venv-tl/bin/python benchmarks/jlens_tl.py --texts texts.json --layers 6,12,18 --out tl.pt
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", required=True, help="a JSON list of texts")
    parser.add_argument("--layers", required=True, help="source layers, e.g. 6,12,18")
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--dim-batch", type=int, default=64)
    parser.add_argument("--skip-first", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis import JacobianLens

    from pyvene_patchscopes import load_model

    texts = json.loads(open(args.texts).read())
    layers = [int(x) for x in args.layers.split(",")]
    handle = load_model("smollm2-135m")
    bridge = TransformerBridge.boot_transformers(
        handle.model.config.name_or_path, hf_model=handle.model, tokenizer=handle.tokenizer, device="cpu"
    )
    for text in texts:  # the same token ids on both sides, or the comparison means nothing
        ours = handle.tokenizer(text, return_tensors="pt", truncation=True, max_length=args.max_seq_len)["input_ids"]
        theirs = bridge.to_tokens(text)[:, : args.max_seq_len]
        if not torch.equal(ours, theirs.to(ours.device)):
            raise SystemExit(
                f"tokenization differs: ours {ours[0, :5].tolist()}..., bridge {theirs[0, :5].tolist()}..."
            )
    start = time.perf_counter()
    lens = JacobianLens.fit(
        bridge,
        texts,
        corpus="pydoc_data topics prose (next-token train split)",
        source_layers=layers,
        dim_batch=args.dim_batch,
        max_seq_len=args.max_seq_len,
        skip_first_positions=args.skip_first,
        show_progress=True,
    )
    seconds = time.perf_counter() - start
    lens.save(args.out, dtype=torch.float32)
    print(
        json.dumps(
            {
                "transformer_lens": version("transformer-lens"),
                "seconds": seconds,
                "n_prompts": lens.n_prompts,
                "source_layers": lens.source_layers,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
