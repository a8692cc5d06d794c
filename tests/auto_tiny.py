"""A tiny random model of every causal-LM class in the installed transformers, its sizes set generically.

The classes come from transformers' own ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, so a new release's families are
built without anyone editing a list. Every size keyword the config class takes is set to a tiny value (hidden
64, 4 layers, 4 heads, 2 key/value heads, 4 experts, the tiny tokenizer's special ids); a multimodal config
gets a tiny text config. A class whose tiny model cannot be built, or that is not decoder-only, is listed
with the reason.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
import transformers
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

from pyvene_patchscopes.models import ModelHandle
from tiny import VOCAB, tiny_tokenizer

MAX_PARAMETERS = 5_000_000  # a config whose sizes are not all set generically stays big: listed, not built
SIZES = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, head_dim=16, max_position_embeddings=128, sliding_window=16,
    num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    bos_token_id=0, eos_token_id=0, pad_token_id=1,
)
# the head size follows from these where a config has them (latent attention: nope + rope parts)
_DERIVED_HEAD = ("qk_rope_head_dim",)


def causal_lm_classes() -> dict[str, str]:
    """Every causal-LM class name of the installed transformers, with the first model type mapped to it."""
    classes: dict[str, str] = {}
    for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        classes.setdefault(name, model_type)
    return dict(sorted(classes.items()))


def not_decoder_only(model_type: str) -> str:
    """Why a mapped class is not a decoder-only model ("" when it is): an encoder, or half of a seq2seq model."""
    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "the decoder half of an encoder-decoder model"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "an encoder (a masked LM) run as a decoder"
    return ""


def decoder_only_classes() -> dict[str, str]:
    return {name: kind for name, kind in causal_lm_classes().items() if not not_decoder_only(kind)}


def _keywords(config_class: type) -> set[str]:
    return set(inspect.signature(config_class.__init__).parameters)


def tiny_config(class_name: str):
    """The class's config class with every size keyword it takes set to a tiny value (multimodal: its text one)."""
    config_class = getattr(transformers, class_name).config_class
    accepted = _keywords(config_class)
    kwargs = {k: v for k, v in SIZES.items() if k in accepted}
    if any(k in accepted for k in _DERIVED_HEAD):
        kwargs.pop("head_dim", None)
    text = getattr(config_class, "sub_configs", {}).get("text_config")
    if text is not None and "text_config" in accepted:
        text_accepted = _keywords(text)
        text_kwargs = {k: v for k, v in SIZES.items() if k in text_accepted}
        if any(k in text_accepted for k in _DERIVED_HEAD):
            text_kwargs.pop("head_dim", None)
        kwargs["text_config"] = text(**text_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_class(**kwargs)


@dataclass
class Built:
    name: str
    handle: ModelHandle | None
    reason: str = ""  # why it was not built


@functools.lru_cache(maxsize=None)
def build(class_name: str, seed: int = 0) -> Built:
    """A tiny fp32 eval-mode model of `class_name` with the tiny tokenizer, or the reason it cannot be built."""
    cls = getattr(transformers, class_name)
    try:
        config = tiny_config(class_name)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parameters = sum(p.numel() for p in cls(config).parameters())
        if parameters > MAX_PARAMETERS:
            return Built(class_name, None, f"its tiny config still has {parameters:,} parameters: a size it "
                                           "needs is not one of the generic keywords")
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls(config).eval()
            with torch.no_grad():
                model(input_ids=torch.tensor([[5, 9, 17]]), use_cache=False)
    except Exception as err:  # noqa: BLE001 -- any failure to build is the reason this class is listed
        message = str(err).splitlines()[0][:140] if str(err) else ""
        return Built(class_name, None, f"its tiny config does not build or run ({type(err).__name__}: {message})")
    return Built(class_name, ModelHandle(name=f"tiny-{class_name}", model=model, tokenizer=tiny_tokenizer()))


__all__ = ["SIZES", "causal_lm_classes", "decoder_only_classes", "not_decoder_only", "tiny_config", "build", "Built"]
