"""A tiny random model of every causal-LM class in the installed transformers, with the tiny tokenizer.

The classes and their tiny configs come from `pyvene_patchscopes.tools.families` (transformers' own causal-LM mapping,
sizes set generically), so a new release's families are built here without anyone editing a list. Each model is
built once per test session; `verdicts` is the same survey ``patchscopes families`` prints.
"""

from __future__ import annotations

import functools

import torch
from tiny import VOCAB, tiny_tokenizer

from pyvene_patchscopes.models import ModelHandle
from pyvene_patchscopes.tools import families

assert families.VOCAB == VOCAB, "the surveyed configs must fit the tiny tokenizer's vocabulary"


@functools.lru_cache(maxsize=None)
def model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module | None:
    """The class's tiny model (seed 0), None where it cannot be built."""
    try:
        built = families.tiny_model(name)
    except Exception:  # noqa: BLE001 -- the survey lists the reason; here the class is simply not built
        return None
    if dtype == torch.float64:  # transformers' grouped expert kernels take no float64; its eager loop does
        try:
            built.set_experts_implementation("eager")
        except (ValueError, AttributeError, NotImplementedError):
            pass  # not a mixture of experts
    return built.to(dtype)


def handle(name: str, dtype: torch.dtype = torch.float32) -> ModelHandle:
    built = model(name, dtype)
    assert built is not None, f"{name} does not build"
    return ModelHandle(name=f"tiny-{name}", model=built, tokenizer=tiny_tokenizer())


@functools.lru_cache(maxsize=None)
def verdicts() -> dict[str, families.Verdict]:
    """Every causal-LM class's verdict, on the same models the tests use."""
    out = {}
    for name, kind in families.causal_lm_classes().items():
        built = model(name) if not families.not_decoder_only(kind, name) else None
        out[name] = families.verdict(name, kind, built) if built is not None else families.verdict(name, kind)
    return out


def runnable() -> list[str]:
    """The classes that run Patchscopes: planned or plain."""
    return [name for name, v in verdicts().items() if v.path in ("planned", "plain")]


__all__ = ["model", "handle", "verdicts", "runnable"]
