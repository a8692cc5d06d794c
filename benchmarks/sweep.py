"""Benchmark: token-identity Patchscope sweeps, three implementations timed side by side in one process.

(a) official  the official code's per-pair loop (PAIR-code patchscopes_utils `inspect`): for each
              (prompt, l, l*) a source forward with output_hidden_states and a target forward with a
              forward hook that overwrites the block output at i*;
(b) pyvene    a per-pair loop through plain pyvene (this package's plain path: one collect call and one
              patch call per pair);
(c) engine    `pyvene_patchscopes.execution.sweeps`: one source pass per prompt, the planned target execution.

Work: the token-identity preset (target "cat -> cat\\n1135 -> 1135\\nhello -> hello\\n? ->", patched at "?"),
next-token readout, (1) l* = l over all layers for N prompts, (2) the full l x l* grid for a few prompts.
The per-pair loops cost the same per pair whatever the number of pairs, so they may time an evenly
spaced subset (--baseline-pairs); (c) always runs the whole work. Their top-1 tokens are compared
with (c) on the pairs they ran.

    python benchmarks/sweep.py --prompts 32 --out benchmarks/results/cpu.json
    python benchmarks/sweep.py --device cuda --dtype bfloat16 --prompts 512 --baseline-pairs 300 \\
        --max-batch-tokens 1048576 --out benchmarks/results/h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from pyvene_patchscopes import Source, load_model, run
from pyvene_patchscopes.analysis.fit import default_texts
from pyvene_patchscopes.execution.sweeps import sweep
from pyvene_patchscopes.presets import TOKEN_IDENTITY_PROMPT, token_identity


def source_prompts(n: int) -> list[str]:
    """N prose snippets from Python's own docs, each ending on a content word (the state read is its last token).

    The first pass takes one snippet from the start of each paragraph; later passes start 7, 14, ... words in."""
    out = []
    texts = [text.split() for text in default_texts()]
    for offset in range(0, 100, 7):
        for all_words in texts:
            words = all_words[offset:]
            for end in range(6, min(len(words), 24)):
                word = words[end].strip(".,;:()\"'")
                if word.isalpha() and len(word) >= 5:
                    snippet = " ".join(words[:end] + [word])
                    if snippet not in out:
                        out.append(snippet)
                    break
            if len(out) == n:
                return out
    raise SystemExit(f"--prompts {n}: only {len(out)} prompts are available")


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak on GPUs, resident-set peak (sampled) on CPUs."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def timed(device: str, fn: Callable[[], Any]) -> tuple[Any, float, int]:
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return out, seconds, memory.peak


# ---- (a) the official code's loop ---------------------------------------------------------------------------
def official_loop(handle, pairs: list[tuple[str, int, int]]) -> list[int]:
    """PAIR-code `inspect` per pair: hidden_states from a source forward, a hook on block l* of the target."""
    model, tokenizer = handle.model, handle.tokenizer
    target = tokenizer(TOKEN_IDENTITY_PROMPT, return_tensors="pt").to(handle.device)
    position_target = len(tokenizer(TOKEN_IDENTITY_PROMPT.rsplit("?", 1)[0] + "?")["input_ids"]) - 1
    out = []
    with torch.no_grad():
        for prompt, layer_source, layer_target in pairs:
            source = tokenizer(prompt, return_tensors="pt").to(handle.device)
            hidden = model(**source, output_hidden_states=True).hidden_states[layer_source + 1][0, -1]
            if layer_source == handle.n_layers - 1 and layer_target == handle.n_layers - 1:
                module = model.model.norm  # skip_final_ln: hidden_states[-1] is already normed
            else:
                module = model.model.layers[layer_target]

            def hook(mod, args, output, hidden=hidden):
                states = output[0] if isinstance(output, tuple) else output
                states[0, position_target] = hidden

            handle_ = module.register_forward_hook(hook)
            try:
                logits = model(**target).logits[0, -1]
            finally:
                handle_.remove()
            out.append(int(torch.softmax(logits.float(), -1).argmax()))
    return out


# ---- (b) plain pyvene, per pair ---------------------------------------------------------------------------------
def pyvene_loop(handle, pairs: list[tuple[str, int, int]]) -> list[int]:
    out = []
    for prompt, layer_source, layer_target in pairs:
        scope = token_identity(
            Source(prompt, -1, layer_source, handle.name), target_layer=layer_target, max_new_tokens=0
        )
        out.append(run(scope, handle, planned=False, progress=False)[0].top[0].token_id)
    return out


def evenly(items: list, k: int) -> list:
    if k <= 0 or k >= len(items):
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)] if k > 1 else items[:1]


def workload(name: str, handle, prompts: list[str], same_layer: bool, baseline_pairs: int, args) -> dict[str, Any]:
    layers = list(range(handle.n_layers))
    cells = (
        [(p, l, l) for p in range(len(prompts)) for l in layers]
        if same_layer
        else [(p, l, t) for p in range(len(prompts)) for l in layers for t in layers]
    )

    def engine():
        return sweep(
            prompts,
            handle,
            target_layers="same" if same_layer else None,
            max_new_tokens=0,
            keep_logits=False,
            progress=False,
            batch_size=args.source_batch,
            max_batch_tokens=args.max_batch_tokens,
            top=1,
        )

    engine()  # warm-up: allocator, kernels
    grid, c_seconds, c_memory = timed(args.device, engine)
    top1 = grid.top_ids[..., 0]
    subset = evenly(cells, baseline_pairs)
    pairs = [(prompts[p], l, t) for p, l, t in subset]
    expected = [int(top1[p, l, 0 if same_layer else t]) for p, l, t in subset]
    official_loop(handle, pairs[:2])  # warm-up
    a_ids, a_seconds, a_memory = timed(args.device, lambda: official_loop(handle, pairs))
    b_ids, b_seconds, b_memory = (
        ([], 0.0, 0) if args.skip_pyvene else timed(args.device, lambda: pyvene_loop(handle, pairs))
    )
    rate = {"official": len(pairs) / a_seconds, "engine": len(cells) / c_seconds}
    if not args.skip_pyvene:
        rate["pyvene"] = len(pairs) / b_seconds
    result = {
        "work": name,
        "prompts": len(prompts),
        "cells": len(cells),
        "baseline_pairs": len(pairs),
        "seconds": {"official": a_seconds, "pyvene": b_seconds or None, "engine": c_seconds},
        "patchscopes_per_s": rate,
        "peak_memory_bytes": {"official": a_memory, "pyvene": b_memory or None, "engine": c_memory},
        "c_over_a": rate["engine"] / rate["official"],
        "c_over_b": rate["engine"] / rate["pyvene"] if "pyvene" in rate else None,
        "top1_agreement": {
            "official_vs_engine": sum(x == y for x, y in zip(a_ids, expected)) / len(pairs),
            "pyvene_vs_engine": (sum(x == y for x, y in zip(b_ids, expected)) / len(pairs)) if b_ids else None,
        },
    }
    return result


def table(results: list[dict[str, Any]], device: str, dtype: str) -> str:
    memory = "GPU peak" if device.startswith("cuda") else "RSS peak"
    lines = [
        f"| work | (a) official /s | (b) pyvene /s | (c) engine /s | c/a | c/b | {memory} (c) | top-1 a=c |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r["patchscopes_per_s"]
        lines.append(
            f"| {r['work']} ({r['prompts']} prompts, {r['cells']} cells) | {rate['official']:.1f} | "
            f"{rate.get('pyvene', float('nan')):.1f} | {rate['engine']:.0f} | {r['c_over_a']:.0f} | "
            f"{(r['c_over_b'] or float('nan')):.0f} | {r['peak_memory_bytes']['engine'] / 2**30:.2f} GiB | "
            f"{r['top1_agreement']['official_vs_engine']:.3f} |"
        )
    return "\n".join(lines) + f"\n\n{device}, {dtype}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=32, help="N source prompts for the l* = l sweep")
    parser.add_argument("--grid-prompts", type=int, default=2, help="prompts for the full l x l* grid (0: skip)")
    parser.add_argument(
        "--baseline-pairs",
        type=int,
        default=0,
        help="pairs timed for (a) and (b), evenly spaced over the work (0: all)",
    )
    parser.add_argument(
        "--grid-baseline-pairs", type=int, default=150, help="pairs timed for (a) and (b) on the grid work (0: all)"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--source-batch", type=int, default=512, help="source prompts read per pass")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-pyvene", action="store_true", help="leave out (b)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    handle = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    results = [workload("l* = l", handle, source_prompts(args.prompts), True, args.baseline_pairs, args)]
    if args.grid_prompts:
        results.append(
            workload("l x l* grid", handle, source_prompts(args.grid_prompts), False, args.grid_baseline_pairs, args)
        )
    report = {
        "model": handle.name,
        "device": args.device,
        "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    print(table(results, args.device, args.dtype))
    write_report(args.out, report)
    return 0


def prompts_benchmark(
    doc: str, argv: list[str] | None, prompts: int, repeats: int, prompts_help: str = "source prompts"
) -> tuple[argparse.Namespace, Any, list[str]]:
    """(arguments, model, prompts) of a one-process benchmark on --model over --prompts, timed --repeats times:
    the options it shares with the others, warnings off, no gradients."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=prompts, help=prompts_help)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    return args, load_model(args.model), source_prompts(args.prompts)


def write_report(out: str | None, report: dict[str, Any]) -> None:
    """The results as JSON at `out` (nothing when it is None)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {out}")


if __name__ == "__main__":
    raise SystemExit(main())
