"""Golden references: hand-written forward hooks that read and write the same hidden states as the engine.

Each prompt runs on its own (no padding) so the reference is independent of the engine's batching.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn
from transformers import GenerationConfig

from pyvene_patchscopes.models import ModelHandle

# Written by hand from each family's modeling file, apart from the library's architecture table on purpose:
# a reference that read the table would agree with it whatever it said.
_PATHS = {  # class name: (the decoder blocks, the final norm)
    **dict.fromkeys(
        [
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Phi3ForCausalLM",
            "Olmo2ForCausalLM",
        ],
        ("model.layers", "model.norm"),
    ),
    "GPT2LMHeadModel": ("transformer.h", "transformer.ln_f"),
    "GPTNeoXForCausalLM": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
}


def _paths(model: nn.Module) -> tuple[str, str]:
    name = type(model).__name__
    if name in _PATHS:
        return _PATHS[name]
    if model not in _MATCHED:
        _MATCHED[model] = _match_hidden_states(model)
    return _MATCHED[model]


_MATCHED: "weakref.WeakKeyDictionary[nn.Module, tuple[str, str]]" = weakref.WeakKeyDictionary()


def _match_hidden_states(model: nn.Module) -> tuple[str, str]:
    """For a class not written above: the ModuleList whose block l outputs HF's hidden_states[l + 1], and the
    module whose output is hidden_states[-1] (the final norm). Found by comparing outputs with what HF returns,
    never from the library's discovery, so a wrong discovery cannot agree with its own reference."""
    outputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    head = model.get_output_embeddings()
    hooks = [head.register_forward_pre_hook(lambda mod, args: outputs.update({"<head input>": args[0].clone()}))]
    for path, module in model.named_modules():

        def store(mod, args, out, path=path) -> None:
            out = _hidden(out)
            calls[path] = calls.get(path, 0) + 1
            if isinstance(out, torch.Tensor):
                outputs[path] = out.detach().clone()

        hooks.append(module.register_forward_hook(store))
    try:
        with torch.no_grad():
            states = model(
                input_ids=torch.tensor([[5, 9, 17, 30]]), output_hidden_states=True, use_cache=False
            ).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    n = len(states) - 1

    def same(path: str, state: torch.Tensor) -> bool:
        return path in outputs and outputs[path].shape == state.shape and torch.equal(outputs[path], state)

    # HF's hidden_states[l + 1] is block l's output (Mamba and RWKV leave the embeddings out: [l] there)
    blocks = [
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) in (n, n + 1)
        and any(all(same(f"{path}.{l}", states[l + shift]) for l in range(len(m) - 1)) for shift in (0, 1))
    ]
    # the final norm: whatever hands the unembedding its input (the last block itself where there is no norm)
    last = f"{blocks[0]}.{len(model.get_submodule(blocks[0])) - 1}" if blocks else ""
    head_input = outputs.get("<head input>")
    norms = [
        path
        for path in outputs
        if path != "<head input>"
        and head_input is not None
        and not any(path.startswith(b + ".") for b in blocks)
        and same(path, head_input)
    ]
    if norms and calls.get(norms[-1], 1) > 1:  # NanoChat's one norm also runs before the blocks: no single
        return blocks[0], last  # site after it, so the last layer is the last block's output
    if not norms and last and same(last, head_input):
        norms = [last]
    if not norms:  # the head reads a scaled copy (MiniCPM3 divides by width / base width): HF's last entry
        norms = [
            path
            for path in outputs
            if not any(path.startswith(b + ".") for b in blocks) and path != "<head input>" and same(path, states[-1])
        ]
    if not blocks or not norms:
        raise KeyError(f"no blocks reproduce hidden_states in {type(model).__name__} (blocks {blocks}, norm {norms})")
    return blocks[0], norms[-1]


def block(model: nn.Module, layer: int) -> nn.Module:
    return model.get_submodule(_paths(model)[0])[layer]


def final_norm(model: nn.Module) -> nn.Module:
    return model.get_submodule(_paths(model)[1])


def site(model: nn.Module, layer: int, after_norm: bool) -> nn.Module:
    return final_norm(model) if after_norm else block(model, layer)


def _hidden(output):
    # transformers 5.24: every family's decoder layer returns a fresh tensor (4.x returned tuples), so an
    # in-place write in a forward hook is what the next layer receives
    return output[0] if isinstance(output, tuple) else output


def encode(handle: ModelHandle, prompt: str) -> torch.Tensor:
    return handle.tokenizer(prompt, return_tensors="pt")["input_ids"]


def read(handle: ModelHandle, prompt: str, layer: int, position: int, after_norm: bool = False) -> torch.Tensor:
    """The hidden state at (prompt, position) after block `layer` (or after the final norm)."""
    return read_all(handle, prompt, layer, after_norm)[position]


def read_all(handle: ModelHandle, prompt: str, layer: int, after_norm: bool = False) -> torch.Tensor:
    """The hidden states at every token of `prompt` after block `layer` (or after the final norm): [tokens, d]."""
    seen = {}

    def store(mod, args, out) -> None:  # returns None: a hook that returns a value replaces the output
        seen["h"] = _hidden(out)[0].clone()

    hook = site(handle.model, layer, after_norm).register_forward_hook(store)
    try:
        with torch.no_grad():
            handle.model(encode(handle, prompt))
    finally:
        hook.remove()
    return seen["h"]


def _writer(position: int, vector: torch.Tensor, prompt_pass_only: bool):
    def hook(mod, args, out):
        hidden = _hidden(out)
        if prompt_pass_only and hidden.shape[1] == 1:
            return out  # a KV-cached decode step: the paper patches only the prompt pass
        hidden[0, position] = vector
        return out

    return hook


def patched_logits(
    handle: ModelHandle, prompt: str, layer: int, position: int, vector: torch.Tensor, after_norm: bool = False
) -> torch.Tensor:
    """Last-position logits of `prompt` with `vector` written at (position, layer)."""
    return patched_all_logits(handle, prompt, layer, position, vector, after_norm)[-1]


def patched_all_logits(
    handle: ModelHandle, prompt: str, layer: int, position: int, vector: torch.Tensor, after_norm: bool = False
) -> torch.Tensor:
    """The logits at every position of `prompt` with `vector` written at (position, layer): [tokens, vocab]."""
    hook = site(handle.model, layer, after_norm).register_forward_hook(_writer(position, vector, False))
    try:
        with torch.no_grad():
            return handle.model(encode(handle, prompt)).logits[0]
    finally:
        hook.remove()


def patched_generate(
    handle: ModelHandle, prompt: str, layer: int, position: int, vector: torch.Tensor, max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy generation with the patch on the prompt pass (KV cache on): new token ids, first-step logits."""
    hook = block(handle.model, layer).register_forward_hook(_writer(position, vector, True))
    return _generate_hooked(handle, prompt, hook, max_new_tokens)


def _generate_hooked(handle: ModelHandle, prompt: str, hook, max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy new token ids and first-step logits of `prompt` with `hook` in place; the hook is removed after."""
    tok = handle.tokenizer
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    ids = encode(handle, prompt)
    try:
        with torch.no_grad():
            out = handle.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        hook.remove()
    return out.sequences[0, ids.shape[1] :].tolist(), out.logits[0][0]


def segment_mask(n_tokens: int, shared: int, first: int, dtype: torch.dtype) -> torch.Tensor:
    """By hand: tokens [0, shared) visible to all, [shared, shared+first) and the rest never see each other."""
    seg = [0] * shared + [1] * first + [2] * (n_tokens - shared - first)
    allowed = torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril()
    for q in range(n_tokens):
        for k in range(n_tokens):
            if {seg[q], seg[k]} == {1, 2}:
                allowed[q, k] = False
    return torch.zeros(n_tokens, n_tokens, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def rerouted(
    handle: ModelHandle,
    prompt: str,
    read_layer: int,
    read_position: int,
    write_layer: int,
    write_position: int,
    mask: torch.Tensor | None,
    max_new_tokens: int = 0,
):
    """Read (read_layer, read_position) and write it at (write_layer, write_position) of the same sequence.

    One pass when read_layer <= write_layer; otherwise the state comes from a first, unpatched pass.
    Returns (all prompt logits [n, V], greedily generated ids).
    """
    ids = encode(handle, prompt)
    n = ids.shape[1]
    attention = mask if mask is not None else torch.ones_like(ids)
    held: dict[str, torch.Tensor] = {}

    def reader(mod, args, out):
        if _hidden(out).shape[1] > 1:
            held["h"] = _hidden(out)[0, read_position].clone()

    def writer(mod, args, out):
        if _hidden(out).shape[1] > 1:
            _hidden(out)[0, write_position] = held["h"]
        return out

    def both(mod, args, out):
        reader(mod, args, out)
        return writer(mod, args, out)

    hooks = []
    try:
        with torch.no_grad():
            if read_layer > write_layer:
                hooks.append(block(handle.model, read_layer).register_forward_hook(reader))
                handle.model(ids, attention_mask=attention, position_ids=torch.arange(n)[None])
                hooks.pop().remove()
                hooks.append(block(handle.model, write_layer).register_forward_hook(writer))
            elif read_layer == write_layer:
                hooks.append(block(handle.model, read_layer).register_forward_hook(both))
            else:
                hooks.append(block(handle.model, read_layer).register_forward_hook(reader))
                hooks.append(block(handle.model, write_layer).register_forward_hook(writer))
            out = handle.model(ids, attention_mask=attention, position_ids=torch.arange(n)[None], use_cache=True)
            # transformers 5 takes and returns the cache as `cache` (`past_key_values` warns, and goes in 5.40)
            new_api = "cache" in inspect.signature(handle.model.forward).parameters
            logits, generated = out.logits[0], []
            cache = out.cache if new_api else out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for step in range(max_new_tokens):
                generated.append(int(token))
                if int(token) == handle.tokenizer.eos_token_id:
                    break
                step_out = handle.model(
                    token,
                    use_cache=True,
                    attention_mask=torch.ones(1, n + step + 1, dtype=torch.long),
                    position_ids=torch.tensor([[n + step]]),
                    **{"cache" if new_api else "past_key_values": cache},
                )
                cache = step_out.cache if new_api else step_out.past_key_values
                token = step_out.logits[:, -1].argmax(-1, keepdim=True)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, generated


# ---- write modes at several slots (issue 26): each method's formula written out by hand ---------------------------
WRITES = {
    "replace": lambda h, v, a: a * v,  # the paper's Patchscope at a = 1
    "mix": lambda h, v, a: a * v + (1 - a) * h,  # SelfIE, 'normalized' (overlay_strength a)
    "add": lambda h, v, a: h + a * v,  # SelfIE, 'addition'; a steering vector
    "norm-matched-add": lambda h, v, a: h + h.norm() * a * v / v.norm(),  # Activation Oracles' steering hook
}


def _slot_writer(slots: list[int], vectors: torch.Tensor, write: str, alpha: float, prompt_pass_only: bool):
    formula = WRITES[write]

    def hook(mod, args, out):
        hidden = _hidden(out)
        if prompt_pass_only and hidden.shape[1] == 1:
            return out
        for k, slot in enumerate(slots):
            hidden[0, slot] = formula(hidden[0, slot].clone(), vectors[k] if vectors.ndim == 2 else vectors, alpha)
        return out

    return hook


def written_logits(
    handle: ModelHandle,
    prompt: str,
    layer: int,
    slots: list[int],
    vectors: torch.Tensor,
    write: str = "replace",
    alpha: float = 1.0,
    after_norm: bool = False,
) -> torch.Tensor:
    """Last-position logits of `prompt` with `vectors` ([d], or one per slot) written at `slots` after block `layer`."""
    hook = site(handle.model, layer, after_norm).register_forward_hook(
        _slot_writer(slots, vectors, write, alpha, False)
    )
    try:
        with torch.no_grad():
            return handle.model(encode(handle, prompt)).logits[0, -1]
    finally:
        hook.remove()


def written_generate(
    handle: ModelHandle,
    prompt: str,
    layer: int,
    slots: list[int],
    vectors: torch.Tensor,
    write: str,
    alpha: float,
    max_new_tokens: int,
) -> list[int]:
    """Greedy tokens with the write on the prompt pass only (KV cache on), as SelfIE and the paper patch."""
    hook = block(handle.model, layer).register_forward_hook(_slot_writer(slots, vectors, write, alpha, True))
    return _generate_hooked(handle, prompt, hook, max_new_tokens)[0]
