"""The fast path: a decoder's layers run by hand, so that many patched rows share one target prompt.

Rows that patch the same target prompt T at the same position i* differ only in the layer l* they
patch and the vector written there. So the work splits into what all rows share and what each owns:

- the prefix T[:i*] never sees the patch (attention is causal): its keys and values are computed once;
- below l*, the suffix T[i*:] is the unpatched prompt: also computed once, in the same pass;
- a row computes only from layer l*+1 up, starting from the shared states with its vector at i*.

Rows are sorted by l*, so at layer j the rows that compute are a leading slice of the batch and no
gather is needed. The arithmetic is the model's own (its decoder-layer modules are called directly);
only the order of work changes, and each layer reads the prefix held once through `prefix_attention`.
Where a model keeps its layers, norm, rotary embedding and unembedding, and its quirks (soft-capping,
sliding windows, attention sinks), comes from `architectures`. For a family found in the model (not in
the table), what the first block receives is the model's own: its forward runs up to block 0 (learned
positions, offsets and embedding multipliers included). Tests hold it to the plain pyvene path within
1e-4 in fp32 for every causal-LM class of the installed transformers that takes it; `check` verifies a
found family on the model.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import transformers
from torch import nn

from ..models.architectures import Architecture
from ..models.devices import input_device
from ..models.discovery import layer_types as config_layer_types, softcap
from ..models.parts import text_config, weight_of
from ..spec.writes import REPLACE_ONE, Slots
from .prefix_attention import ATTENTION, KeysValues, LayerKeys, attending_to, register_attention

# the layer call below is transformers 5's (a cache object updated in place, a tensor returned)
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no dropout, as pyvene's path runs), every module's own flag restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@dataclass
class TargetPass:
    """The unpatched target prompt T and i*, where it splits into a prefix T[:i*] and a suffix T[i*:]."""

    input_ids: torch.Tensor  # [T]
    split: int  # i*

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def suffix(self) -> int:
        return self.length - self.split


@dataclass
class Shared(TargetPass):
    """The unpatched target prompt, computed once: prefix keys/values and suffix states at every layer."""

    keys: list[torch.Tensor]  # per layer [1, kv_heads, T, head_dim] (after rotary, as the cache holds them)
    values: list[torch.Tensor]
    hidden: list[torch.Tensor]  # per layer: the suffix's block output [S, d]


@dataclass
class Decoded:
    """What a batch of patched rows produced: first-step logits and, when generating, the greedy tokens."""

    logits: torch.Tensor  # [B, vocab] at the end of T, float32
    tokens: list[list[int]] | None  # per row, up to and including EOS
    states: torch.Tensor | None = None  # [B, d] the last block's output at the end of T (keep_states)
    suffix: torch.Tensor | None = None  # [B, T - i*, vocab] float32 logits at every position from i* on (keep_suffix)


class Stack:
    """One model's embedding, decoder layers, final norm and unembedding, called layer by layer."""

    def __init__(self, model: nn.Module, arch: Architecture):
        self.model, self.arch = model, arch
        self.layers = arch.blocks(model)
        self.embed = arch.module(model, arch.embed)
        self.position_embed = arch.module(model, arch.position_embed) if arch.position_embed else None
        base = arch.layers.rpartition(".")[0]
        self.base = arch.module(model, base) if base else model  # the text model whose forward embeds
        self.norm = arch.module(model, arch.final_norm) if arch.final_norm else nn.Identity()
        self.rotary = arch.module(model, arch.rotary) if arch.rotary else None
        self.lm_head = arch.module(model, arch.unembed)
        config = text_config(model)
        self.n_layers = len(self.layers)
        self.layer_types = layer_types(config, arch)
        self.sliding_window = getattr(config, "sliding_window", None)
        self.chunk = getattr(config, "attention_chunk_size", None)
        self.softcap = softcap(config) if arch.logit_softcap else None
        self.logit_factor = arch.logit_scale or 1.0  # Cohere's logit_scale, Granite's 1 / logits_scaling
        self.per_type_rotary = (
            self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters
        )
        parameters = inspect.signature(self.layers[0].forward).parameters
        self.layer_keywords = set(parameters)
        self.any_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
        self.base_positions = "position_ids" in inspect.signature(self.base.forward).parameters

    @property
    def dtype(self) -> torch.dtype:
        return weight_of(self.lm_head).dtype

    @property
    def device(self) -> torch.device:
        """Where the rows start: the input embedding's device; each block's accelerate hook (if any) moves its
        inputs to its own device."""
        return input_device(self.model)

    # ---- pieces ----------------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What the first block receives: for a table family, its embedding (scaled inside the module for Gemma)
        plus learned positions (GPT-2); for a found one, the model's own forward stopped there (learned positions
        with OPT's offset, embedding multipliers, norms before the blocks included)."""
        if not self.arch.found:
            hidden = self.embed(ids)
            return hidden if self.position_embed is None else hidden + self.position_embed(positions)[None]
        seen: dict[str, torch.Tensor] = {}

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _FirstBlockReached

        handle = self.layers[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)  # before any user hook
        extra = {"position_ids": positions[None].expand(ids.shape[0], -1)} if self.base_positions else {}
        try:
            self.base(input_ids=ids, use_cache=False, **extra)
        except _FirstBlockReached:
            pass
        finally:
            handle.remove()
        return seen["hidden"]

    def _rotary(
        self, hidden: torch.Tensor, positions: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor] | None]:
        position_ids = positions.unsqueeze(0)
        if self.rotary is None:
            return dict.fromkeys(self.layer_types)
        if self.per_type_rotary:
            return {kind: self.rotary(hidden, position_ids, kind) for kind in set(self.layer_types)}
        shared = self.rotary(hidden, position_ids)
        return {kind: shared for kind in set(self.layer_types)}

    def _masks(self, queries: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Additive [1, 1, Q, K] masks by absolute position: causal, plus the window for sliding layers."""
        q, k = queries[:, None], keys[None, :]
        allowed = {"full_attention": k <= q}
        if self.sliding_window is not None:
            allowed["sliding_attention"] = (k <= q) & (k > q - self.sliding_window)
        if self.chunk:  # Llama 4: attention within fixed chunks of the sequence
            allowed["chunked_attention"] = (k <= q) & (k // self.chunk == q // self.chunk)
        low = torch.finfo(self.dtype).min
        return {
            kind: torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill(~m, low)[None, None]
            for kind, m in allowed.items()
        }

    def _layer(
        self,
        j: int,
        hidden: torch.Tensor,
        rotary,
        masks,
        positions: torch.Tensor,
        prefix: KeysValues | None = None,
        past: KeysValues | None = None,
    ) -> tuple[torch.Tensor, KeysValues]:
        """Layer j on `hidden`, attending to the shared `prefix` ([1, kv, P, d]) and the rows' own `past`."""
        kind = self.layer_types[j]
        cache = LayerKeys(*(past or (None, None)))
        keywords = {
            "attention_mask": masks[kind],
            "position_ids": positions.unsqueeze(0),
            "use_cache": True,
            self.arch.cache_argument: cache,
        }
        if rotary[kind] is not None:
            keywords["position_embeddings"] = rotary[kind]
        if "cache_position" in self.layer_keywords:
            keywords["cache_position"] = positions
        if not self.any_keyword:
            keywords = {k: v for k, v in keywords.items() if k in self.layer_keywords}
        with attending_to(self.model, prefix):
            out = self.layers[j](hidden, **keywords)
        out = out[0] if isinstance(out, tuple) else out
        return out, cache.new  # type: ignore[return-value]  # the layer's update set new

    def unembed(self, normed: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(normed).float()
        if self.logit_factor != 1.0:
            logits = logits * self.logit_factor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # ---- the shared pass -------------------------------------------------------------------------------
    @torch.no_grad()
    def share(self, input_ids: torch.Tensor, split: int) -> Shared:
        """Run the unpatched target prompt once; keep every layer's keys/values and the suffix's states."""
        ids = input_ids.to(self.device)
        positions = torch.arange(ids.shape[0], device=self.device)
        hidden = self._embed(ids[None], positions)
        rotary, masks = self._rotary(hidden, positions), self._masks(positions, positions)
        keys, values, states = [], [], []
        for j in range(self.n_layers):
            hidden, (k, v) = self._layer(j, hidden, rotary, masks, positions)
            keys.append(k)
            values.append(v)
            states.append(hidden[0, split:].clone())
        return Shared(ids, split, keys, values, states)

    # ---- patched rows ----------------------------------------------------------------------------------
    @torch.no_grad()
    def patched(
        self,
        shared: Shared,
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
        """Write vectors[b] at (T, i*) after block layers[b]; return the end-of-T logits (and greedy tokens; with
        `keep_suffix`, the logits at every position from i* on).

        ``after_norm[b]`` marks rows patched after the final norm instead (the paper's ``skip_final_ln``).
        ``pad_token_id`` is unused here (the rows' own decoding pads nothing); `layered` hands it to generate.
        `slots` are the positions written, as offsets from i* (the first), and the write mode; ``alphas[b]`` is
        row b's α. vectors is [rows, d], or [rows, slots, d] with one vector per slot.
        """
        rows = vectors.shape[0]
        order, vectors, active, _ = self.sorted_rows(vectors, layers, after_norm)
        alphas = None if alphas is None else alphas[order.to(alphas.device)].to(self.device)
        keep_cache = max_new_tokens > 1
        split, suffix, length = shared.split, shared.suffix, shared.length
        positions = torch.arange(split, length, device=self.device)
        all_positions = torch.arange(length, device=self.device)
        hidden = torch.empty(rows, suffix, vectors.shape[-1], dtype=self.dtype, device=self.device)
        rotary = self._rotary(hidden, positions)
        masks = self._masks(positions, all_positions)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        for j in range(self.n_layers + 1):
            start, stop = active[j - 1] if j > 0 else 0, active[j]
            if stop > start:  # rows patched after block j-1 begin here
                hidden[start:stop] = shared.hidden[j - 1]
                slots.write(hidden[start:stop], vectors[start:stop], None if alphas is None else alphas[start:stop])
            if j == self.n_layers:
                break
            n = stop
            new_k = new_v = None
            if n:
                prefix = (shared.keys[j][:, :, :split], shared.values[j][:, :, :split])
                hidden[:n], (new_k, new_v) = self._layer(j, hidden[:n], rotary, masks, positions, prefix)
            if keep_cache:
                cache.append(self._row_cache(shared, j, rows, new_k, new_v))
        states = None
        if keep_states:  # rows written after the final norm never ran a block: their last block output is shared
            states = hidden[:, -1].clone()
            states[active[self.n_layers] :] = shared.hidden[-1][-1]
        last = self.norm(hidden[:, -1])
        normed_rows = active[self.n_layers + 1] - active[self.n_layers]
        if normed_rows:  # skip_final_ln rows: the final norm's output itself is replaced at i*
            start = active[self.n_layers]
            base = self.norm(shared.hidden[-1][-1]).expand(rows - start, -1)
            last[start:] = slots.at_last(base, vectors[start:], None if alphas is None else alphas[start:], suffix)
        logits = self.unembed(last)
        tokens = self._greedy(shared, logits, cache, max_new_tokens, eos_token_id) if max_new_tokens else None
        inverse = torch.argsort(order)
        logits = logits[inverse.to(logits.device)]
        if tokens is not None:
            tokens = [tokens[int(i)] for i in inverse]
        every = None
        if keep_suffix:  # rows written after the final norm start from the normed unpatched suffix
            normed = self.norm(hidden)
            if normed_rows:
                start = active[self.n_layers]
                normed[start:] = self.norm(shared.hidden[-1])
                slots.write(normed[start:], vectors[start:], None if alphas is None else alphas[start:])
            every = self.unembed(normed)[inverse.to(normed.device)]
        return Decoded(logits, tokens, None if states is None else states[inverse.to(states.device)], every)

    def suffix_logits(self, shared: Shared) -> torch.Tensor:
        """The unpatched prompt's logits at every position from i* on: [T - i*, vocab], float32."""
        return self.unembed(self.norm(shared.hidden[-1]))

    def row_keys(self, layers: torch.Tensor, after_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(after_norm, each row's key) on the CPU: the key is the row's l*, or n_layers for a row written after
        the final norm, so that sorting by it orders rows by where they begin to differ."""
        layers = layers.cpu()
        after_norm = torch.zeros_like(layers, dtype=torch.bool) if after_norm is None else after_norm.cpu()
        return after_norm, torch.where(after_norm, torch.full_like(layers, self.n_layers), layers)

    def sorted_rows(
        self, vectors: torch.Tensor, layers: torch.Tensor, after_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
        """Rows sorted by key: (the order, the vectors in it, active, after_norm in the rows' own order), where
        active[j] counts the rows patched below layer j, i.e. the rows that compute layer j (a leading slice)."""
        after_norm, key = self.row_keys(layers, after_norm)
        order = torch.argsort(key, stable=True)
        vectors = vectors[order.to(vectors.device)].to(self.device, self.dtype)
        active = torch.searchsorted(key[order], torch.arange(self.n_layers + 2), right=False).tolist()
        return order, vectors, active, after_norm

    def _row_cache(self, shared: Shared, j: int, rows: int, new_k, new_v) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row keys/values of layer j over the suffix T[i*:]: computed rows first, then unpatched ones."""
        n = 0 if new_k is None else new_k.shape[0]
        keys = shared.keys[j][:, :, shared.split :].expand(rows, -1, -1, -1).clone()
        values = shared.values[j][:, :, shared.split :].expand(rows, -1, -1, -1).clone()
        if n:
            keys[:n], values[:n] = new_k, new_v
        return keys, values

    def _greedy(
        self,
        shared: Shared,
        logits: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        max_new_tokens: int,
        eos_token_id: int | None,
    ) -> list[list[int]]:
        """Greedy decoding from the patched prompt's per-row cache (the patch is on the prompt pass only)."""
        rows = logits.shape[0]
        token = logits.argmax(-1)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        for step in range(max_new_tokens):
            for row, value in enumerate(token.tolist()):
                if not done[row]:
                    tokens[row].append(value)
                    done[row] = value == eos_token_id
            if all(done) or step == max_new_tokens - 1:
                break
            position = torch.tensor([shared.length + step], device=self.device)
            hidden = self._embed(token[:, None].to(self.device), position)
            rotary = self._rotary(hidden, position)
            masks = self._masks(position, torch.arange(shared.length + step + 1, device=self.device))
            for j in range(self.n_layers):
                keys, values = cache[j]
                prefix = (shared.keys[j][:, :, : shared.split], shared.values[j][:, :, : shared.split])
                hidden, (k, v) = self._layer(j, hidden, rotary, masks, position, prefix, (keys, values))
                cache[j] = (torch.cat([keys, k], 2), torch.cat([values, v], 2))
            token = self.unembed(self.norm(hidden[:, -1])).argmax(-1)
        return tokens


class _FirstBlockReached(Exception):
    """Raised by the pre-hook on block 0 once the model's forward has computed that block's input."""


def layer_types(config, arch: Architecture) -> list[str]:
    """Each layer's attention kind, "full_attention" or "sliding_attention", as the family's forward decides it."""
    n = config.num_hidden_layers
    if arch.sliding_window == "none" and "chunked_attention" not in (getattr(config, "layer_types", None) or ()):
        return ["full_attention"] * n
    kinds = config_layer_types(config)
    if arch.sliding_window == "layer types" or getattr(config, "sliding_window", None):
        return kinds
    return ["full_attention"] * n


__all__ = ["Stack", "Shared", "TargetPass", "Decoded", "evaluating", "layer_types", "register_attention", "ATTENTION"]
