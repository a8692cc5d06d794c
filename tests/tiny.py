"""Tiny random models of the ten supported families, and a tiny trained tokenizer, all built offline in ms."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pyvene_patchscopes.models import ModelHandle, prepare_tokenizer

CORPUS = [
    "Amazon's former CEO attended Oscars",
    "The capital of France is Paris",
    "cat->cat; 1135->1135; hello->hello; ?",
    "The city of Paris is large",
    "Here is a word: dog",
    "The capital city of x is",
    "Tokyo London Berlin Rome",
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, x",
    "one two three four five six",
] * 4
VOCAB = 320
WINDOW = 16  # the sliding window of every family that has one: shorter than the long test prompts
POSITIONS = 128
HEADS = 4


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 2,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )
    return prepare_tokenizer(tok)


# ---- one config per family -------------------------------------------------------------------------
# llama, gemma3 and gpt2 are the configs the older tests were written on: their numbers must not move.
# The newer families use the tiny tokenizer's special ids (bos = eos = 0, pad = 1): the defaults of some
# (Phi-3's pad 32000) lie outside the tiny vocabulary.
_SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)


def _llama(layers: int, hidden: int) -> PreTrainedConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
    )


def _mistral(layers: int, hidden: int) -> PreTrainedConfig:
    """Grouped-query attention; every layer attends within a sliding window."""
    return MistralConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
        sliding_window=WINDOW,
        **_SPECIAL,
    )


def _qwen2(layers: int, hidden: int) -> PreTrainedConfig:
    """Grouped-query attention; the layers from max_window_layers up slide, the ones below see everything."""
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=layers // 2,
        **_SPECIAL,
    )


def _qwen3(layers: int, hidden: int) -> PreTrainedConfig:
    """Grouped-query attention and RMS norms on the queries and keys (the family's defaults)."""
    return Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=hidden // HEADS,
        max_position_embeddings=POSITIONS,
        **_SPECIAL,
    )


def _gemma2(layers: int, hidden: int) -> PreTrainedConfig:
    """Sliding and global layers alternating, soft-capped attention scores and logits (the defaults), sqrt(d)
    scaled embeddings."""
    return Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=hidden // HEADS,
        query_pre_attn_scalar=hidden // HEADS,
        max_position_embeddings=POSITIONS,
        sliding_window=WINDOW,
        **_SPECIAL,
    )


def _gemma3(layers: int, hidden: int) -> PreTrainedConfig:
    return Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=POSITIONS,
        sliding_window=16,
    )


def _phi3(layers: int, hidden: int) -> PreTrainedConfig:
    """Rotary positions on half of each head's dimensions; every layer slides."""
    return Phi3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
        original_max_position_embeddings=POSITIONS,
        sliding_window=WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        **_SPECIAL,
    )


def _olmo2(layers: int, hidden: int) -> PreTrainedConfig:
    """Norms after attention and MLP instead of before, RMS norms on the queries and keys (the defaults)."""
    return Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        **_SPECIAL,
    )


def _gpt2(layers: int, hidden: int) -> PreTrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=hidden,
        n_layer=layers,
        n_head=HEADS,
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt_neox(layers: int, hidden: int) -> PreTrainedConfig:
    """Pythia: rotary positions on a quarter of each head's dimensions, attention and MLP in parallel."""
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True,
        **_SPECIAL,
    )


FAMILY_CONFIGS: dict[str, tuple[type[PreTrainedModel], Callable[[int, int], PreTrainedConfig]]] = {
    "llama": (LlamaForCausalLM, _llama),
    "mistral": (MistralForCausalLM, _mistral),
    "qwen2": (Qwen2ForCausalLM, _qwen2),
    "qwen3": (Qwen3ForCausalLM, _qwen3),
    "gemma2": (Gemma2ForCausalLM, _gemma2),
    "gemma3": (Gemma3ForCausalLM, _gemma3),
    "phi3": (Phi3ForCausalLM, _phi3),
    "olmo2": (Olmo2ForCausalLM, _olmo2),
    "gpt2": (GPT2LMHeadModel, _gpt2),
    "gpt_neox": (GPTNeoXForCausalLM, _gpt_neox),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_config(kind: str, layers: int = 4, hidden: int = 64) -> PreTrainedConfig:
    if kind not in FAMILY_CONFIGS:
        raise ValueError(f"kind={kind!r} is not a tiny family (allowed: {', '.join(FAMILIES)})")
    return FAMILY_CONFIGS[kind][1](layers, hidden)


def tiny_model(kind: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0) -> ModelHandle:
    """A random fp32 model of family `kind` (one of FAMILIES) in eval mode, with the tiny tokenizer."""
    config = tiny_config(kind, layers, hidden)
    torch.manual_seed(seed)
    model = FAMILY_CONFIGS[kind][0](config)
    model.eval()
    return ModelHandle(name=f"tiny-{kind}", model=model, tokenizer=tiny_tokenizer())


def tiny_loader(kind: str = "llama"):
    """A stand-in for `models.load_model` in command-line tests: the same checks of the model name, device and
    dtype, then a tiny random model under the name asked for (no embedded model is loaded)."""
    from pyvene_patchscopes import models, wrap_model

    def load(name: str = "smollm2-135m", device="cpu", dtype=None) -> ModelHandle:
        models.model_source(name)
        models.check_device(device)
        models.resolve_dtype(dtype)
        handle = tiny_model(kind, seed=0)
        return wrap_model(handle.model, handle.tokenizer, name=name)

    return load
