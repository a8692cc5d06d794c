"""The shared-prefix attention: every row attends to one prefix's keys and values, held once for all rows.

`Stack` calls a decoder's layers by hand with the target prompt's prefix T[:i*] computed once. Inside one layer call
(`attending_to`), the model's attention is transformers' attention interface entry `ATTENTION`, which reads that
prefix beside the row's own keys and values; `LayerKeys` stands in for HF's cache to hand the row's earlier keys and
values over and take its new ones back.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import nn
from transformers import AttentionInterface

from ..models.parts import hf_config

ATTENTION = "patchscopes-shared-prefix"
KeysValues = tuple[torch.Tensor, torch.Tensor]  # a layer's keys and values, [rows, kv heads, positions, head size]
# the shared prefix of the layer being called: read by `shared_prefix_attention` whatever keywords the layer passes
_PREFIX: ContextVar[KeysValues | None] = ContextVar("patchscopes_prefix", default=None)


class LayerKeys:
    """A stand-in for HF's cache during one layer call: puts a row's earlier keys/values before the new ones.

    The shared prefix is not copied per row: it reaches `shared_prefix_attention` through `attending_to`.
    """

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        self.keys, self.values = keys, values
        self.new: KeysValues | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:  # Llama 4 asks before its chunked attention
        return 0 if self.keys is None else int(self.keys.shape[2])

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new = (key, value)
        if self.keys is None or self.values is None or self.keys.shape[2] == 0:
            return key, value
        return torch.cat([self.keys, key], dim=2), torch.cat([self.values, value], dim=2)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[n, heads, q, d] -> [kv_heads, n * groups * q, d], head h reading key/value head h // groups."""
    n, heads, q, d = x.shape
    return x.reshape(n, heads // groups, groups, q, d).permute(1, 0, 2, 3, 4).reshape(heads // groups, -1, d)


def shared_prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Softmax attention over [shared prefix ; the row's own keys], the prefix held once for all rows.

    query [n, H, q, d]; key [n, kv, k, d]; value [n, kv, k, dv] (dv differs from d in latent attention);
    prefix [1, kv, P, ·]; attention_mask additive [1, 1, q, P + k]. Same arithmetic as eager attention
    (float32 softmax), without materialising the prefix per row. A module with ``sinks`` (GPT-OSS) adds its
    learned per-head logit to every softmax and drops it after, as its eager attention does.
    """
    n, heads, q, d = query.shape
    kv_heads, dv = key.shape[1], value.shape[-1]
    prefix = _prefix_for(module, kv_heads)
    groups = heads // kv_heads
    scale = d**-0.5 if scaling is None else scaling
    own = torch.matmul(query.reshape(n, kv_heads, groups * q, d), key.mT).view(n, kv_heads, groups, q, -1)
    parts = [own]
    if prefix is not None and prefix[0].shape[2]:
        p_keys = prefix[0][0]
        shared = torch.bmm(_grouped(query, groups), p_keys.transpose(-1, -2))  # [kv, n*g*q, P]
        parts.insert(0, shared.view(kv_heads, n, groups, q, -1).permute(1, 0, 2, 3, 4))
    scores = torch.cat(parts, dim=-1) * scale
    softcap = kwargs.get("softcap")
    if softcap is not None:  # Gemma 2: tanh-capped scores, before the mask as in its eager attention
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask.unsqueeze(2)
    sinks = getattr(module, "sinks", None)
    if sinks is not None:  # [H] -> one more column per head, as [n, kv, groups, q, 1]
        column = sinks.to(scores.dtype).view(1, kv_heads, groups, 1, 1).expand(n, -1, -1, q, 1)
        scores = torch.cat([scores, column], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    width = probs.shape[-1] - key.shape[2]
    out = torch.matmul(probs[..., width:].reshape(n, kv_heads, groups * q, -1), value).view(n, kv_heads, groups, q, dv)
    if width and prefix is not None:
        p_probs = probs[..., :width].permute(1, 0, 2, 3, 4).reshape(kv_heads, -1, width)
        out = out + torch.bmm(p_probs, prefix[1][0]).view(kv_heads, n, groups, q, dv).permute(1, 0, 2, 3, 4)
    return out.reshape(n, heads, q, dv).transpose(1, 2).contiguous(), None


def _prefix_for(module: nn.Module, kv_heads: int) -> KeysValues | None:
    """The layer's shared prefix as keys/values of `kv_heads` heads, as the layer hands its own to attention.

    Latent attention (DeepSeek V2/V3) caches the compressed latents and expands them with ``expand_kv``; a few
    families (JetMoe, Doge) repeat their key/value heads before the attention function is called.
    """
    prefix = _PREFIX.get()
    if prefix is None or not prefix[0].shape[2]:
        return prefix
    if callable(expand := getattr(module, "expand_kv", None)):
        prefix = expand(*prefix)
    repeat = kv_heads // prefix[0].shape[1]
    if repeat > 1:
        prefix = (prefix[0].repeat_interleave(repeat, dim=1), prefix[1].repeat_interleave(repeat, dim=1))
    return prefix


def register_attention() -> None:
    """Make `shared_prefix_attention` known to transformers under `ATTENTION`: on first use, not on import."""
    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, shared_prefix_attention)


@contextmanager
def _attention(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through `shared_prefix_attention` for the duration, then restore it."""
    register_attention()
    config = hf_config(model)
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


@contextmanager
def attending_to(model: nn.Module, prefix: KeysValues | None) -> Iterator[None]:
    """For one layer call: the model's attention through `shared_prefix_attention`, `prefix` its shared prefix."""
    token = _PREFIX.set(prefix)
    try:
        with _attention(model):
            yield
    finally:
        _PREFIX.reset(token)


__all__ = ["ATTENTION", "KeysValues", "LayerKeys", "attending_to", "register_attention", "shared_prefix_attention"]
