"""Fit the paper's affine mapping f by least squares: ``np.linalg.lstsq`` on [X, 1] -> [Y, 1].

Two settings:
- one model, layer l -> layer l* (the tuned-lens style map to the last layer): X and Y are the states of
  the same tokens;
- two models of different hidden sizes (the cross-model map): the texts are tokenised by both models and
  states are paired wherever both have read the same decoded prefix, as the official code aligns them.

X and Y are read where the Patchscope reads and writes (see ``models.sites.hidden_state_site``): the source at
layer l, the target at layer l* before the final norm unless both are the last layer of one model.
Hidden states are gathered in batches, with a progress bar; on one model every layer (and the last layer both
before and after its norm) comes from one forward pass per batch.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..compat import pyvene_guard
from ..errors import SpecError
from ..models import ModelHandle
from ..models.order import data_first
from ..models.sites import final_norm_path
from ..spec.mappings import Affine


def default_texts(limit: int | None = None) -> list[str]:
    """English prose that ships with Python (the language reference's topic texts), one paragraph each.

    The paper fits on the Pile; with no dataset hub here this is the corpus that is always present.
    Pass your own `texts` for a better-matched map.
    """
    from pydoc_data.topics import topics

    paragraphs = (" ".join(p.split()) for text in topics.values() for p in text.split("\n\n"))
    prose = [p for p in paragraphs if len(p) > 200 and p[:1].isupper() and p.count("(") < 4][:limit]
    return [p[:600] for p in prose]


def _layer(owner: str, layer: int, handle: ModelHandle) -> int:
    n = handle.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise SpecError(f"{owner}={layer!r} is out of range for {handle.name} (allowed: {-n}..{n - 1})")
    return layer % n


@contextlib.contextmanager
def _pre_norm_capture(handle: ModelHandle, store: list) -> Iterator[None]:
    """Capture the input of the final norm: the last block's output before normalisation."""
    norm = handle.model.get_submodule(final_norm_path(handle.model))
    hook = norm.register_forward_pre_hook(lambda module, args: store.append(args[0].detach()))
    try:
        yield
    finally:
        hook.remove()


def gather(
    handle: ModelHandle,
    texts: Sequence[str],
    layer: int,
    after_final_norm: bool = False,
    batch_size: int = 8,
    progress: bool | None = None,
    desc: str = "gather",
) -> list[torch.Tensor]:
    """Per text, the states ``[n_tokens, d]`` of `layer` for every token, in order (padding removed).

    ``after_final_norm`` matters only for the last layer: HF's ``hidden_states[-1]`` (after the norm) or
    the block output before it.
    """
    return gather_layers(handle, texts, [layer], after_final_norm, batch_size, progress, desc)[layer % handle.n_layers]


def gather_layers(
    handle: ModelHandle,
    texts: Sequence[str],
    layers: Sequence[int],
    after_final_norm: bool = False,
    batch_size: int = 8,
    progress: bool | None = None,
    desc: str = "gather",
) -> dict[int, list[torch.Tensor]]:
    """`gather` for several layers from the same forward passes: {layer: [per-text states]}."""
    last = handle.n_layers - 1
    wanted = sorted({_layer("layer", layer, handle) for layer in layers})
    sites = gather_sites(
        handle, texts, [(layer, after_final_norm and layer == last) for layer in wanted], batch_size, progress, desc
    )
    return {layer: sites[(layer, after_final_norm and layer == last)] for layer in wanted}


def gather_sites(
    handle: ModelHandle,
    texts: Sequence[str],
    sites: Sequence[tuple[int, bool]],
    batch_size: int = 8,
    progress: bool | None = None,
    desc: str = "gather",
) -> dict[tuple[int, bool], list[torch.Tensor]]:
    """States at several (layer, after_final_norm) sites, all from one forward pass per batch.

    A site's ``after_final_norm`` matters only for the last layer (HF's ``hidden_states[-1]`` is after the norm;
    the block output before it is captured at the norm's input), so the last layer may be read both ways at once.
    Returns {(layer, after_final_norm): [per-text states [n_tokens, d]]}, keyed as `sites` gives them.
    """
    from ..plan.batching import Batch, chunks

    last = handle.n_layers - 1
    keys = list(dict.fromkeys((_layer("layer", layer, handle), bool(after)) for layer, after in sites))
    out: dict[tuple[int, bool], list[torch.Tensor]] = {key: [] for key in keys}
    batches = list(chunks(list(texts), batch_size))
    show = progress if progress is not None else len(batches) > 4
    with pyvene_guard(handle.model), torch.no_grad():
        for batch_texts in tqdm(batches, desc=desc, unit="batch", disable=not show):
            batch = Batch.encode(handle, batch_texts)
            captured: list[torch.Tensor] = []
            capture = _pre_norm_capture(handle, captured) if (last, False) in out else contextlib.nullcontext()
            with capture:
                result = handle.model(**batch.inputs, output_hidden_states=True, logits_to_keep=1)
            for layer, after in keys:
                states = captured[0] if (layer, after) == (last, False) else result.hidden_states[layer + 1]
                out[(layer, after)].extend(states[row, pad:].float().cpu() for row, pad in enumerate(batch.pad))
    return out


def lstsq_affine(x: torch.Tensor, y: torch.Tensor) -> Affine:
    """The paper's fit: ``np.linalg.lstsq([X, 1], [Y, 1])``, giving f(h) = W h + b."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise SpecError(
            f"fit needs X [n, d_source] and Y [n, d_target] with the same n, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] <= x.shape[1]:
        raise SpecError(
            f"fit has {x.shape[0]} samples for hidden size {x.shape[1]} "
            f"(allowed: more samples than dimensions); pass more texts"
        )
    ones = np.ones((x.shape[0], 1))
    x1 = np.concatenate([x.double().numpy(), ones], axis=1)
    y1 = np.concatenate([y.double().numpy(), ones], axis=1)
    solution, *_ = np.linalg.lstsq(x1, y1, rcond=None)  # [d_s + 1, d_t + 1]
    d_t = y.shape[1]
    weight = torch.from_numpy(solution[:-1, :d_t].T.copy()).float()
    bias = torch.from_numpy(solution[-1, :d_t].copy()).float()
    return Affine.from_weights(weight, bias)


def _prefix_tokens(handle: ModelHandle, text: str) -> int:
    """How many tokens the tokenizer puts before the text (BOS, document start)."""
    return len(handle.tokenizer(text, add_special_tokens=True)["input_ids"]) - len(
        handle.tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def aligned_positions(text: str, source: ModelHandle, target: ModelHandle) -> list[tuple[int, int]]:
    """Token index pairs (i, i*) at which both models have read exactly the same text.

    As the official cross-model code checks before pairing states: the decoded prefix through token i in
    the source equals the decoded prefix through token i* in the target. Indices count the tokens each
    tokenizer puts before the text (BOS, document start); the first text token is left out (sink-adjacent).
    """
    ids_s = source.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids_t = target.tokenizer(text, add_special_tokens=False)["input_ids"]
    prefixes_t = {target.tokenizer.decode(ids_t[: k + 1]): k for k in range(len(ids_t))}
    shift_s, shift_t = _prefix_tokens(source, text), _prefix_tokens(target, text)
    pairs = []
    for k in range(1, len(ids_s)):
        match = prefixes_t.get(source.tokenizer.decode(ids_s[: k + 1]))
        if match is not None and match > 0:
            pairs.append((shift_s + k, shift_t + match))
    return pairs


def paired_states(
    source: ModelHandle,
    source_layer: int,
    target: ModelHandle,
    target_layer: int,
    texts: Sequence[str],
    batch_size: int = 8,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """X (source states) and Y (target states) of the same tokens, read where a Patchscope reads and writes."""
    source_layer = _layer("source_layer", source_layer, source)
    target_layer = _layer("target_layer", target_layer, target)
    source_site = (source_layer, source_layer == source.n_layers - 1)
    same = source is target
    # the target is read before the final norm unless l = l* = the last layer of one model (skip_final_ln)
    target_site = (target_layer, same and source_site[1] and target_layer == target.n_layers - 1)
    if same:  # one model: both sites from the same forward passes
        states = gather_sites(
            source, texts, [source_site, target_site], batch_size, progress, desc="gather source and target"
        )
        xs, ys = states[source_site], states[target_site]
    else:  # two models, two passes
        xs = gather_sites(source, texts, [source_site], batch_size, progress, desc="gather source")[source_site]
        ys = gather_sites(target, texts, [target_site], batch_size, progress, desc="gather target")[target_site]
    rows_x, rows_y = [], []
    for text, x, y in zip(texts, xs, ys):
        if same:  # the same tokens; skip the sink and the first text token
            start = _prefix_tokens(source, text) + 1
            rows_x.append(x[start:])
            rows_y.append(y[start:])
            continue
        pairs = aligned_positions(text, source, target)
        rows_x.append(x[[i for i, _ in pairs]])
        rows_y.append(y[[j for _, j in pairs]])
    return torch.cat(rows_x), torch.cat(rows_y)


@data_first("model", "layers", "texts=None")
def fit_tuned_lens(
    texts: Sequence[str] | None,
    model: ModelHandle,
    layers: Sequence[int],
    batch_size: int = 8,
    progress: bool | None = None,
) -> dict[int, Affine]:
    """One affine map per layer to the last layer (before its final norm), from one set of forward passes, on
    `texts` (None: `default_texts()`)."""
    texts = list(texts) if texts is not None else default_texts()
    last = model.n_layers - 1
    layers = sorted({_layer("layers", layer, model) for layer in layers} - {last})
    states = gather_layers(
        model,
        texts,
        [*layers, last],
        after_final_norm=False,
        batch_size=batch_size,
        progress=progress,
        desc="gather layers",
    )
    starts = [_prefix_tokens(model, text) + 1 for text in texts]
    y = torch.cat([s[k:] for s, k in zip(states[last], starts)])
    return {layer: lstsq_affine(torch.cat([s[k:] for s, k in zip(states[layer], starts)]), y) for layer in layers}


@data_first("source", "source_layer", "target", "target_layer", "texts=None", models=("source", "target"))
def fit_affine(
    texts: Sequence[str] | None,
    source: ModelHandle,
    source_layer: int,
    target: ModelHandle | None = None,
    target_layer: int = -1,
    batch_size: int = 8,
    progress: bool | None = None,
) -> Affine:
    """Fit f: (M, l) -> (M*, l*) by least squares on `texts` (None: `default_texts()`).

    With ``target=None`` (M* = M) this is the tuned-lens style map from layer l to layer l*, by default
    the last layer. With another model it is the cross-model map, of shape [d_target, d_source].
    """
    target = source if target is None else target
    texts = list(texts) if texts is not None else default_texts()
    x, y = paired_states(source, source_layer, target, target_layer, texts, batch_size, progress)
    return lstsq_affine(x, y)


__all__ = [
    "fit_affine",
    "fit_tuned_lens",
    "aligned_positions",
    "lstsq_affine",
    "paired_states",
    "gather",
    "gather_layers",
    "gather_sites",
    "default_texts",
]
