"""The planned execution for families the shared prefix cannot serve: the layers below l* shared, the target whole.

Rows that patch one target prompt T at (i*, l*) see the unpatched prompt below l* (the patch is written after
block l*). So the model's own forward on T runs once, and a pre-hook on every block records what the model gives
it: its input and every keyword (rotary tables, masks, ALiBi, per-layer inputs, a hybrid's shared embeddings). A
row then starts from block l*'s recorded output with its vector at i*, and calls blocks l*+1 … L-1 on the whole
prompt with the keywords the model gave them. Nothing of a block's own arithmetic is replaced, so recurrent
(state-space, linear-attention, convolution) layers, attention outside transformers' interface and position
biases all run as in the model; only the work below l* is shared, and rows are batched across l*.

A keyword that carries the batch (a mask of [1, …], BLOOM's ALiBi of [batch·heads, …]) is tiled to the rows: which
dimension carries it is read once per model, by recording the blocks' keywords at batch 1 and at batch 2.
Greedy tokens come from the model's own `generate`, with hooks writing each row's vector on the prompt pass.
`check.probe` holds each model to hand-written hooks before it takes this path.
"""

from __future__ import annotations

import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import GenerationConfig

from ..models.parts import generator
from ..models.probes import hooks_restored
from ..spec.writes import REPLACE_ONE, Slots
from .stack import Decoded, Stack, TargetPass

# per model: for each recorded block input, the dimension that grows with the batch (None where it does not)
_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, list[list[int | None]]]" = weakref.WeakKeyDictionary()
# models whose batched decoding from their own cache differs from recomputing the sequence (RWKV's state at
# batch > 1, in transformers 5.25): `check.probe` finds them, and their greedy tokens are recomputed
_RECOMPUTE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def decode_without_cache(model: nn.Module) -> None:
    """Greedy tokens for `model` recompute the whole sequence each step (its cached decoding is not exact)."""
    _RECOMPUTE.add(model)


@dataclass
class Recorded(TargetPass):
    """The unpatched target prompt's pass: each block's positional and keyword inputs, and each block's output."""

    calls: list[tuple[tuple, dict[str, Any]]]  # per block: (args after the hidden states, keywords)
    outputs: list[Any]  # per block: its output as it returned it ([1, T, d] first)


def hidden_of(out: Any) -> torch.Tensor:
    """The hidden state in what a block returns: the tensor, or a tuple's (or list's) first entry."""
    return out[0] if isinstance(out, (tuple, list)) else out


def record_blocks(
    model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor
) -> tuple[list[tuple[tuple, dict[str, Any]]], list[Any]]:
    """The model's own forward on `ids`: what it gave each block (args after the hidden states, keywords) and what
    each block returned."""
    calls: list[tuple[tuple, dict[str, Any]]] = []
    outputs: list[Any] = []

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args[1:], kwargs if args else {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    def after(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        outputs.append(out)

    handles = [
        h
        for block in blocks
        for h in (
            block.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
            block.register_forward_hook(after, with_kwargs=True, prepend=True),
        )
    ]
    try:
        with hooks_restored(model):
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(outputs) != len(blocks):
        raise ValueError(f"{len(outputs)} of {len(blocks)} blocks ran in the model's forward")
    return calls, outputs


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, (tuple, list)):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def _mapped(tree: Any, leaves: Iterator[Any]) -> Any:
    """`tree` with its leaves replaced, in `_leaves` order, by the next items of `leaves`."""
    if isinstance(tree, dict):
        return {key: _mapped(value, leaves) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        items = [_mapped(value, leaves) for value in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return next(leaves)


def _batch_dim(one: Any, two: Any) -> int | None:
    """The dimension of a block input that doubles from batch 1 to batch 2 (None: the same for every row)."""
    if not (isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor)) or one.shape == two.shape:
        return None
    for dim, (a, b) in enumerate(zip(one.shape, two.shape)):
        if b == 2 * a and a > 0:
            return dim
    raise ValueError(f"a block input of shape {tuple(one.shape)} at batch 1 is {tuple(two.shape)} at batch 2")


def _tiled(value: Any, dim: int | None, rows: int) -> Any:
    if dim is None or rows == 1:
        return value
    if value.shape[dim] == 1:
        return value.expand(*[rows if d == dim else -1 for d in range(value.ndim)])
    return value.repeat(*[rows if d == dim else 1 for d in range(value.ndim)])


class Layered(Stack):
    """A model's blocks called one by one on the whole target, with the inputs its own forward gave them."""

    def _layout(self) -> list[list[int | None]]:
        """Which dimension of each block input carries the batch, read from the model at batch 1 and batch 2."""
        if self.model not in _LAYOUTS:
            ids = torch.arange(2, 6, device=self.device)[None]
            one, _ = record_blocks(self.model, self.layers, ids)
            two, _ = record_blocks(self.model, self.layers, ids.expand(2, -1))
            _LAYOUTS[self.model] = [
                [_batch_dim(a, b) for a, b in zip(_leaves(x), _leaves(y))] for x, y in zip(one, two)
            ]
        return _LAYOUTS[self.model]

    # ---- the shared pass -------------------------------------------------------------------------------
    @torch.no_grad()
    def share(self, input_ids: torch.Tensor, split: int) -> Recorded:  # type: ignore[override]  # records every block: Recorded
        """Run the model's own forward on the unpatched prompt once, recording every block's inputs and output."""
        ids = input_ids.to(self.device)
        self._layout()
        return Recorded(ids, split, *record_blocks(self.model, self.layers, ids[None]))

    def _block(self, j: int, shared: Recorded, hidden: torch.Tensor) -> torch.Tensor:
        rest, keywords = shared.calls[j]
        dims = iter(self._layout()[j])
        tiled = _mapped(
            (rest, keywords), (_tiled(leaf, next(dims), hidden.shape[0]) for leaf in _leaves((rest, keywords)))
        )
        return hidden_of(self.layers[j](hidden, *tiled[0], **tiled[1]))

    # ---- patched rows ----------------------------------------------------------------------------------
    @torch.no_grad()
    def patched(  # type: ignore[override]  # reads a Recorded, not a Shared
        self,
        shared: Recorded,
        vectors: torch.Tensor,
        layers: torch.Tensor,
        max_new_tokens: int = 0,
        eos_token_id: int | None = None,
        after_norm: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        slots: Slots = REPLACE_ONE,
        alphas: torch.Tensor | None = None,
        keep_states: bool = False,
        keep_suffix: bool = False,
    ) -> Decoded:
        """Write vectors[b] at (T, i*) after block layers[b] (or after the final norm); the end-of-T logits (and,
        with `keep_suffix`, those at every position from i* on)."""
        rows = vectors.shape[0]
        order, vectors, active, after_norm = self.sorted_rows(vectors, layers, after_norm)
        sorted_alphas = None if alphas is None else alphas[order.to(alphas.device)].to(self.device)
        hidden = hidden_of(shared.outputs[-1]).expand(rows, -1, -1).clone()  # rows written after the final norm
        for j in range(self.n_layers + 1):
            start, stop = active[j - 1] if j > 0 else 0, active[j]
            if stop > start:  # rows patched after block j-1 begin here
                hidden[start:stop] = hidden_of(shared.outputs[j - 1])[0]
                slots.write(
                    hidden[start:stop],
                    vectors[start:stop],
                    None if sorted_alphas is None else sorted_alphas[start:stop],
                    shared.split,
                )
            if j < self.n_layers and stop:
                hidden[:stop] = self._block(j, shared, hidden[:stop])
        states = hidden[:, -1].clone() if keep_states else None
        last = self.norm(hidden[:, -1])
        start = active[self.n_layers]
        if rows > start:  # skip_final_ln rows: the final norm's output written at i*
            last[start:] = slots.at_last(
                last[start:], vectors[start:], None if sorted_alphas is None else sorted_alphas[start:], shared.suffix
            )
        logits = self.unembed(last)
        inverse = torch.argsort(order)
        logits = logits[inverse.to(logits.device)]
        every = None
        if keep_suffix:  # rows written after the final norm: the normed unpatched suffix, written at i*
            normed = self.norm(hidden[:, shared.split :])
            if rows > start:
                sorted_start = None if sorted_alphas is None else sorted_alphas[start:]
                slots.write(normed[start:], vectors[start:], sorted_start)
            every = self.unembed(normed)[inverse.to(normed.device)]
        tokens = None
        if max_new_tokens:
            back = vectors[inverse.to(vectors.device)]
            tokens = patched_greedy(
                self,
                shared.input_ids,
                shared.split,
                back,
                layers.cpu(),
                after_norm,
                max_new_tokens,
                eos_token_id,
                pad_token_id,
                slots=slots,
                alphas=alphas,
            )
        return Decoded(logits, tokens, None if states is None else states[inverse.to(states.device)], every)

    def suffix_logits(self, shared: Recorded) -> torch.Tensor:  # type: ignore[override]  # reads a Recorded
        """The unpatched prompt's logits at every position from i* on: [T - i*, vocab], float32."""
        return self.unembed(self.norm(hidden_of(shared.outputs[-1])[0, shared.split :]))


@contextmanager
def writing(
    stack: Stack,
    split: int,
    vectors: torch.Tensor,
    layers: torch.Tensor,
    after_norm: torch.Tensor,
    norm: nn.Module | None = None,
    slots: Slots = REPLACE_ONE,
    alphas: torch.Tensor | None = None,
) -> Iterator[None]:
    """Hooks writing row b's vector at i* (and its other `slots`) after block layers[b] (or after the final norm: on
    `norm`'s output where given, else into the unembedding), on every pass over the prompt; a cached decoding
    step (no position i*) is left as it is."""

    def written(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        if hidden.shape[1] <= split + slots.offsets[-1]:
            return None
        hidden = hidden.clone()
        slots.written_rows(hidden, rows.to(hidden.device), vectors, alphas, split)
        return hidden

    def writer(rows: torch.Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            hidden = written(hidden_of(out), rows)
            return None if hidden is None else (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        return hook

    def unembedding(rows: torch.Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple) -> Any:
            hidden = written(args[0], rows)
            return None if hidden is None else (hidden, *args[1:])

        return hook

    handles = []
    try:
        for layer in sorted(set(layers[~after_norm].tolist())):
            rows = torch.nonzero((layers == layer) & ~after_norm).flatten()
            handles.append(stack.layers[layer].register_forward_hook(writer(rows)))
        if bool(after_norm.any()):
            rows = torch.nonzero(after_norm).flatten()
            handles.append(
                norm.register_forward_hook(writer(rows))
                if norm is not None
                else stack.lm_head.register_forward_pre_hook(unembedding(rows))
            )
        yield
    finally:
        for handle in handles:
            handle.remove()


_CACHE_NAMES = ("past_key_values", "cache", "cache_params", "state")  # what families call their cache


def patched_greedy(
    stack: Stack,
    ids: torch.Tensor,
    split: int,
    vectors: torch.Tensor,
    layers: torch.Tensor,
    after_norm: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int | None = None,
    norm: nn.Module | None = None,
    slots: Slots = REPLACE_ONE,
    alphas: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy tokens of every row from the model's own `generate` (as the plain path), the patch written on the
    prompt pass. A model without a cache, or whose batched cache is not exact, recomputes the sequence each step."""
    model, rows = stack.model, vectors.shape[0]
    sequence = ids.to(stack.device)[None].repeat(rows, 1)  # not expanded: a state updated in place (RWKV) aliases
    name = (
        None
        if model in _RECOMPUTE
        else next((n for n in _CACHE_NAMES if n in inspect.signature(model.forward).parameters), None)
    )
    if name is None:
        return _recomputed(
            stack, sequence, split, vectors, layers, after_norm, max_new_tokens, eos_token_id, norm, slots, alphas
        )
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id,
    )
    # the writes reach the prompt passes
    with hooks_restored(model), writing(stack, split, vectors, layers, after_norm, norm, slots, alphas):
        out = generator(model).generate(sequence, attention_mask=torch.ones_like(sequence), generation_config=config)
    new = out[:, sequence.shape[1] :].tolist()
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in new]


def _recomputed(
    stack: Stack,
    sequence: torch.Tensor,
    split: int,
    vectors: torch.Tensor,
    layers: torch.Tensor,
    after_norm: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    norm: nn.Module | None = None,
    slots: Slots = REPLACE_ONE,
    alphas: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy tokens recomputing the whole sequence each step, the patch written on every pass."""
    rows = sequence.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    with hooks_restored(stack.model), writing(stack, split, vectors, layers, after_norm, norm, slots, alphas):
        for step in range(max_new_tokens):
            token = stack.model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1)
            for row, value in enumerate(token.tolist()):
                if not done[row]:
                    tokens[row].append(value)
                    done[row] = value == eos_token_id
            if all(done):
                break
            sequence = torch.cat([sequence, token[:, None]], dim=1)
    return tokens


__all__ = ["Layered", "Recorded", "decode_without_cache", "hidden_of", "patched_greedy", "record_blocks", "writing"]
