"""Tiny random models and a tiny trained tokenizer, built offline in well under a second."""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from pyvene_patchscopes.models import ModelHandle, prepare_tokenizer

CORPUS = [
    "Amazon's former CEO attended Oscars", "The capital of France is Paris", "cat->cat; 1135->1135; hello->hello; ?",
    "The city of Paris is large", "Here is a word: dog", "The capital city of x is", "Tokyo London Berlin Rome",
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, x", "one two three four five six",
] * 4
VOCAB = 320


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>")
    return prepare_tokenizer(tok)


def tiny_model(kind: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0) -> ModelHandle:
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=hidden, n_layer=layers, n_head=4,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128)
        model = LlamaForCausalLM(config)
    elif kind == "gemma3":
        config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                                  head_dim=32, max_position_embeddings=128, sliding_window=16)
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(kind)
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
