"""Whether a model takes the planned execution, checked on the model itself for families found (not in the table).

A found family passes when nothing in its architecture rules the shared prefix out (`discovery`) and, on a
nine-token probe, the planned pass reproduces the model's own forward: every layer's states, the logits when
each layer's own state is written back at i*, and three greedy tokens. A family that fails runs on the
plain pyvene path, and the reason names what differed. The verdict is worked out once per model.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..architectures import architecture
from ..discovery import hooks_restored
from .stack import _TRANSFORMERS_5, Stack, evaluating

PROBE_LENGTH, PROBE_SPLIT, PROBE_TOKENS = 9, 3, 3
MAX_CROSSED = 256  # a window up to this long is crossed by the probe; a longer one (4,096 in Mistral) is not
_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference from the model's own forward that still counts as the same arithmetic."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def planned_reason(model: nn.Module) -> str:
    """Why `model` cannot take the planned execution, in one line; "" when it takes it."""
    if not _TRANSFORMERS_5:
        return "the planned execution calls decoder layers as transformers 5 defines them"
    arch = architecture(model)
    if not arch.planned:
        return arch.not_planned_because
    if not arch.found:
        return ""  # a table entry: its families are tested against hand-written hooks
    if model not in _VERDICTS:
        _VERDICTS[model] = probe(model)
    return _VERDICTS[model]


def stack_for(model: nn.Module) -> Stack | None:
    """The planned execution's runner for `model`, or None when it runs on the plain pyvene path."""
    return None if planned_reason(model) else Stack(model, architecture(model))


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def probe(model: nn.Module) -> str:
    """Run the planned pass against the model's own forward on a short prompt; "" if they agree."""
    stack = Stack(model, architecture(model))
    vocab = int(stack.lm_head.weight.shape[0])
    length = _probe_length(model)
    ids = (torch.arange(length) * 7 + 3) % max(vocab - 3, 1) + 2
    ids = ids.clamp(max=vocab - 1).to(stack.device)
    limit = tolerance(stack.dtype)
    try:
        with evaluating(model), torch.no_grad(), hooks_restored(model):
            own = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
            states = own.hidden_states
            shared = stack.share(ids, PROBE_SPLIT)
            for j in range(stack.n_layers - 1):
                error = _relative(shared.hidden[j], states[j + 1][0, PROBE_SPLIT:])
                if error > limit:
                    return (f"the planned pass differs from the model's own forward at layer {j} by {error:.2g} "
                            "(relative)")
            layers = sorted({0, stack.n_layers // 2, stack.n_layers - 2} & set(range(stack.n_layers - 1)))
            vectors = torch.stack([states[j + 1][0, PROBE_SPLIT] for j in layers])
            decoded = stack.patched(shared, vectors, torch.tensor(layers), max_new_tokens=PROBE_TOKENS)
            want = own.logits[0, -1].float()
            for row in range(len(layers)):
                error = _relative(decoded.logits[row], want)
                if error > limit:
                    return f"the planned pass's logits differ from the model's own forward by {error:.2g} (relative)"
            last = stack.n_layers - 1  # a row patched after the final norm (skip_final_ln), with its own state
            normed = stack.patched(shared, states[-1][0, PROBE_SPLIT][None], torch.tensor([last]),
                                   after_norm=torch.tensor([True]))
            error = _relative(normed.logits[0], want)
            if error > limit:
                return f"the planned pass's logits after the final norm differ from the model's own by {error:.2g}"
            greedy = _greedy(model, ids, PROBE_TOKENS)
            if any(tokens != greedy for tokens in decoded.tokens or []):
                return "the planned pass's greedy tokens differ from the model's own (its decoding steps differ)"
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError, NotImplementedError) as err:
        message = str(err).splitlines()[0][:160] if str(err) else ""
        return f"its decoder layers cannot be called on the suffix alone ({type(err).__name__}: {message})"
    return ""


def _probe_length(model: nn.Module) -> int:
    """Long enough to cross a short sliding window or attention chunk (tiny and test configs), else nine tokens."""
    config = model.config.get_text_config()
    spans = [w for w in (getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None))
             if isinstance(w, int) and 0 < w <= MAX_CROSSED]
    return max([PROBE_LENGTH] + [w + PROBE_SPLIT + 3 for w in spans])


def _greedy(model: nn.Module, ids: torch.Tensor, steps: int) -> list[int]:
    """The model's own greedy continuation, each step a full forward pass without a cache."""
    sequence, tokens = ids[None], []
    for _ in range(steps):
        token = model(input_ids=sequence, use_cache=False).logits[0, -1].argmax()
        tokens.append(int(token))
        sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
    return tokens


__all__ = ["planned_reason", "probe", "tolerance", "stack_for"]
