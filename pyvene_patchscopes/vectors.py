"""Vectors to read in words, from where researchers keep them: an SAE's decoder rows in sae-lens's saved format.

sae-lens saves an SAE as a folder: ``cfg.json`` (``d_in``, ``d_sae``, ``architecture``, and the hook it was
trained on, ``hook_name``, at the top level in older versions and under ``meta`` since 6.0) and
``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec``). Latent k
writes ``W_dec[k]`` into the residual stream at that hook. This module reads the folder without sae-lens:
JSON and safetensors only, size-capped, inside the folder, every shape and value checked, and the hook named
as the layer whose block output it is (the layer l of a Patchscope source).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SpecError, as_index
from .files import check_finite, expand, inside, read_json, read_safetensors

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

# hook names -> (pattern, offset): the hook is the output of block (captured index + offset)
_HOOKS = (
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),   # TransformerLens names: after block l
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),   # before block l = after block l - 1
    (re.compile(r"^(?:model\.)?(?:layers|h)\.(\d+)$"), 0),  # a Hugging Face block's own output
)
HOOKS_ALLOWED = ("blocks.L.hook_resid_post, blocks.L.hook_resid_pre (L >= 1), model.layers.L: the residual "
                 "stream at a block output")


def hook_layer(hook_name: object) -> int:
    """The block whose output `hook_name` is, or a `SpecError` naming the hook and what is allowed."""
    if isinstance(hook_name, str):
        for pattern, offset in _HOOKS:
            match = pattern.match(hook_name)
            if match and int(match.group(1)) + offset >= 0:
                return int(match.group(1)) + offset
    raise SpecError(f"SAE hook_name={hook_name!r} is not a residual-stream hook this library can write at "
                    f"(allowed: {HOOKS_ALLOWED})")


@dataclass(frozen=True)
class SAEDecoder:
    """An SAE's decoder: one direction per latent, written at block output `layer` (``W_dec``, [d_sae, d_in])."""

    directions: torch.Tensor   # [d_sae, d_in]
    layer: int
    hook_name: str
    architecture: str
    normalize_activations: str

    @property
    def d_in(self) -> int:
        return int(self.directions.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.directions.shape[0])

    def latent(self, k: int) -> torch.Tensor:
        """Latent k's decoder direction ``W_dec[k]`` ([d_in])."""
        index = None if isinstance(k, bool) else as_index(k)
        if index is None or not 0 <= index < self.d_sae:
            raise SpecError(f"latent={k!r} is out of range for this SAE (allowed: 0..{self.d_sae - 1})")
        return self.directions[index]


def _field(config: dict[str, Any], name: str) -> Any:
    meta = config.get("meta") if isinstance(config.get("meta"), dict) else {}
    return config[name] if name in config else meta.get(name)


def load_sae(folder: str | os.PathLike, model: Any = None) -> SAEDecoder:
    """The decoder of the SAE saved in `folder` (sae-lens's format), checked against `model` when given:
    its width ``d_in`` must be the model's hidden size, and its hook one of the model's block outputs."""
    path = expand(folder)
    config = read_json(inside(path, CONFIG_FILE), "SAE config")
    if not isinstance(config, dict):
        raise SpecError(f"SAE config {CONFIG_FILE!r} in {path} is not a JSON object (allowed: sae-lens's cfg.json)")
    sizes = {}
    for name in ("d_in", "d_sae"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"SAE config {name}={value!r} is not allowed (allowed: a positive integer)")
        sizes[name] = value
    layer = hook_layer(_field(config, "hook_name"))
    weights = read_safetensors(inside(path, WEIGHTS_FILE), "SAE weights")
    if "W_dec" not in weights:
        raise SpecError(f"SAE weights {WEIGHTS_FILE!r} have no 'W_dec' (found: {sorted(weights)[:8]})")
    decoder = weights["W_dec"]
    if tuple(decoder.shape) != (sizes["d_sae"], sizes["d_in"]):
        raise SpecError(f"SAE W_dec has shape {list(decoder.shape)}, but cfg.json says d_sae={sizes['d_sae']}, "
                        f"d_in={sizes['d_in']} (allowed: [d_sae, d_in])")
    check_finite({"W_dec": decoder}, "SAE weight", torch.float32)
    sae = SAEDecoder(decoder.float(), layer, str(_field(config, "hook_name")), str(config.get("architecture", "")),
                     str(config.get("normalize_activations", "none")))
    if model is not None:
        check_against(sae, model)
    return sae


def check_against(sae: SAEDecoder, model: Any) -> None:
    """The SAE fits `model` (a `ModelHandle`): same width, and its layer exists."""
    if sae.d_in != model.hidden_size:
        raise SpecError(f"SAE d_in={sae.d_in} does not match {model.name}'s hidden size {model.hidden_size} "
                        f"(allowed: an SAE trained on {model.name}'s residual stream)")
    if not 0 <= sae.layer < model.n_layers:
        raise SpecError(f"SAE hook_name={sae.hook_name!r} is layer {sae.layer}, out of range for {model.name} "
                        f"(allowed: 0..{model.n_layers - 1})")


__all__ = ["SAEDecoder", "load_sae", "hook_layer", "check_against", "CONFIG_FILE", "WEIGHTS_FILE"]
