"""Which planned runner a model takes, checked on the model itself for families found (not in the table).

The runners are tried in order: the shared prefix (`stack`), where nothing in the architecture rules it out
(`discovery`); the shared layers (`layered`), where the logits are a norm and an unembedding of the last block;
the model's own forward with the lower blocks replayed (`replayed`). A runner is taken when, on a short probe,
rows that write another position's state at three layers and after the final norm give the logits and greedy
tokens of hand-written hooks on the model's own forward and `generate`. A family no runner reproduces runs on
the plain pyvene path, and the reason names what differed. The verdict is worked out once per model.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import GenerationConfig

from ..models.architectures import Architecture, architecture
from ..models.parts import generator, text_config, weight_of
from ..models.probes import hooks_restored
from .layered import Layered, decode_without_cache, writing
from .replayed import Replayed
from .stack import TRANSFORMERS_5, Stack, evaluating

PROBE_LENGTH, PROBE_SPLIT, PROBE_TOKENS = 9, 3, 3
MAX_CROSSED = 256  # a window up to this long is crossed by the probe; a longer one (4,096 in Mistral) is not
SHARED_PREFIX, SHARED_LAYERS, OWN_FORWARD = "shared prefix", "shared layers", "own forward"
_RUNNERS: dict[str, type[Stack]] = {SHARED_PREFIX: Stack, SHARED_LAYERS: Layered, OWN_FORWARD: Replayed}
_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, tuple[str, str]]" = weakref.WeakKeyDictionary()


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference from the model's own forward that still counts as the same arithmetic."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def planned_reason(model: nn.Module) -> str:
    """Why `model` cannot take the planned execution, in one line; "" when it takes it (either way)."""
    kind, why = _verdict(model)
    return "" if kind else why


def execution(model: nn.Module) -> str:
    """How `model` runs its planned execution: "shared prefix", "shared layers", or "" (the plain path)."""
    return _verdict(model)[0]


def stack_for(model: nn.Module) -> Stack | None:
    """The planned execution's runner for `model`, or None when it runs on the plain pyvene path."""
    kind = execution(model)
    if not kind:
        return None
    return _RUNNERS[kind](model, architecture(model))


def _verdict(model: nn.Module) -> tuple[str, str]:
    """(the planned execution's kind or "", why the plain path instead), worked out once per model."""
    if not TRANSFORMERS_5:
        return "", "the planned execution calls decoder layers as transformers 5 defines them"
    arch = architecture(model)
    if not arch.found:
        return (SHARED_PREFIX, "") if arch.planned else ("", arch.not_planned_because)
    if model not in _VERDICTS:
        _VERDICTS[model] = _first_exact(model, arch)
    return _VERDICTS[model]


def _first_exact(model: nn.Module, arch: Architecture) -> tuple[str, str]:
    """The first runner, from the fastest, whose probe passes: (its kind, why the shared prefix cannot serve)."""
    why = arch.not_planned_because or probe(model, Stack)
    if not why:
        return SHARED_PREFIX, ""
    failures = [why]
    if arch.layered:
        whole = probe(model, Layered)
        if not whole:
            return SHARED_LAYERS, why
        failures.append(
            f"calling its blocks on the whole prompt, with the inputs its forward gives them, fails: {whole}"
        )
    replayed = probe(model, Replayed)
    if not replayed:
        return OWN_FORWARD, why
    failures.append(f"its own forward with the lower blocks replayed fails: {replayed}")
    return "", "; and ".join(failures)


def prefix_reason(model: nn.Module) -> str:
    """Why the shared prefix cannot serve `model` ("" when it does): the reason a "shared layers" family gives."""
    return _verdict(model)[1]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def probe(model: nn.Module, runner: type[Stack] = Stack) -> str:
    """Run `runner`'s planned pass against hand-written hooks on the model's own forward; "" if they agree.

    Rows at three layers write another position's state at i* (a real patch), one row writes after the final
    norm; their logits and greedy tokens must be the model's own with the same writes."""
    stack = runner(model, architecture(model))
    vocab = int(weight_of(stack.lm_head).shape[0])
    length = _probe_length(model)
    ids = (torch.arange(length) * 7 + 3) % max(vocab - 3, 1) + 2
    ids = ids.clamp(max=vocab - 1).to(stack.device)
    limit = tolerance(stack.dtype)
    try:
        with evaluating(model), torch.no_grad(), hooks_restored(model):
            own = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
            states = own.hidden_states
            shared = stack.share(ids, PROBE_SPLIT)
            if runner is Stack:
                for j in range(stack.n_layers - 1):
                    error = _relative(shared.hidden[j], states[j + 1][0, PROBE_SPLIT:])
                    if error > limit:
                        return (
                            f"the planned pass differs from the model's own forward at layer {j} by {error:.2g} "
                            "(relative)"
                        )
            layers = sorted({0, stack.n_layers // 2, stack.n_layers - 2} & set(range(stack.n_layers - 1)))
            layers.append(stack.n_layers - 1)  # the last row is written after the final norm (skip_final_ln)
            vectors = torch.stack(
                [states[j + 1][0, PROBE_SPLIT + 1] for j in layers[:-1]] + [stack.norm(states[-1][0, PROBE_SPLIT + 1])]
            )
            at, normed = torch.tensor(layers), torch.tensor([False] * (len(layers) - 1) + [True])
            decoded = stack.patched(shared, vectors, at, max_new_tokens=PROBE_TOKENS, after_norm=normed)
            norm = stack.norm_site() if isinstance(stack, Replayed) else None  # where it writes after the norm
            want, greedy = _hooked(stack, ids, vectors, at, normed, PROBE_TOKENS, norm)
            for row in range(len(layers)):
                error = _relative(decoded.logits[row], want[row])
                if error > limit:
                    where = "after the final norm" if normed[row] else f"at layer {layers[row]}"
                    return (
                        f"the planned pass's logits for a row patched {where} differ from hand-written hooks "
                        f"on the model's own forward by {error:.2g} (relative)"
                    )
            if not _same_tokens(decoded.tokens, greedy) and runner is Layered:  # its batched cache may differ
                decode_without_cache(model)
                decoded = stack.patched(shared, vectors, at, max_new_tokens=PROBE_TOKENS, after_norm=normed)
            if not _same_tokens(decoded.tokens, greedy):
                return (
                    "the planned pass's greedy tokens differ from the model's own generate (its decoding steps differ)"
                )
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError, NotImplementedError) as err:
        message = str(err).splitlines()[0][:160] if str(err) else ""
        alone = "on the suffix alone" if runner is Stack else "with the inputs its forward gave them"
        return f"its decoder layers cannot be called {alone} ({type(err).__name__}: {message})"
    return ""


def _same_tokens(got: list[list[int]] | None, want: list[list[int]]) -> bool:
    """Row by row, the reference's tokens (generate may stop early at the config's EOS) begin the planned ones."""
    return got is not None and all(row[: len(ref)] == ref for row, ref in zip(got, want))


def _hooked(
    stack: Stack,
    ids: torch.Tensor,
    vectors: torch.Tensor,
    layers: torch.Tensor,
    after_norm: torch.Tensor,
    steps: int,
    norm: nn.Module | None = None,
) -> tuple[torch.Tensor, list[list[int]]]:
    """The reference, by hand-written hooks on the model's own forward: every row's first-step logits (one batch,
    no cache), and its greedy tokens from the model's own `generate` on that row alone (the patch on the prompt
    pass, as the plain path and the paper run it). Returns (logits, tokens)."""
    rows = vectors.shape[0]
    with writing(stack, PROBE_SPLIT, vectors, layers, after_norm, norm):
        logits = stack.model(input_ids=ids[None].repeat(rows, 1), use_cache=False).logits[:, -1].float()
    config = GenerationConfig(max_new_tokens=steps, do_sample=False, num_beams=1)
    tokens = []
    for row in range(rows):
        one = slice(row, row + 1)
        with writing(stack, PROBE_SPLIT, vectors[one], layers[one], after_norm[one], norm):
            out = generator(stack.model).generate(
                ids[None], attention_mask=torch.ones_like(ids[None]), generation_config=config
            )
        tokens.append(out[0, ids.shape[0] :].tolist())
    return logits, tokens


def _probe_length(model: nn.Module) -> int:
    """Long enough to cross a short sliding window or attention chunk (tiny and test configs), else nine tokens."""
    config = text_config(model)
    spans = [
        w
        for w in (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))
        if isinstance(w, int) and 0 < w <= MAX_CROSSED
    ]
    return max([PROBE_LENGTH] + [w + PROBE_SPLIT + 3 for w in spans])


__all__ = [
    "planned_reason",
    "prefix_reason",
    "execution",
    "probe",
    "tolerance",
    "stack_for",
    "SHARED_PREFIX",
    "SHARED_LAYERS",
    "OWN_FORWARD",
]
