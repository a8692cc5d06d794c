"""What every evaluation shares: its options, layer grids, the exact lens readout, and sampled prefixes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import SpecError, check_int
from ..models import ModelHandle
from ..models.sites import final_norm_path
from ..spec import DEFAULT_MODEL


@dataclass
class EvalOptions:
    """Knobs shared by the evaluations; None means the task's default (the one the README reports)."""

    limit: int | None = None  # how many samples (texts, facts, entities, queries)
    layers: Sequence[int] | None = None  # source layers l
    target_layers: Sequence[int] | None = None  # target layers l*
    data: str | None = None  # the user's own JSONL instead of the shipped set
    n_train: int | None = None  # training texts for fitted maps
    seed: int = 0  # also seeds the dev/test split and the bootstrap
    select_on: str = "dev"  # where layers are chosen: "dev" (held out, beside the oracle) or "oracle" only
    batch_size: int = 64
    progress: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("limit", "n_train"):
            if getattr(self, name) is not None:
                check_int(f"EvalOptions.{name}", getattr(self, name))
        check_int("EvalOptions.batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SpecError(f"EvalOptions.seed={self.seed!r} is not allowed (allowed: an integer)")
        if self.select_on not in ("dev", "oracle"):
            raise SpecError(f"EvalOptions.select_on={self.select_on!r} is not known (allowed: dev, oracle)")

    def pick(self, name: str, default: Any) -> Any:
        value = getattr(self, name)
        return default if value is None else value


def folder_name(task: str, model: str) -> str:
    """``TASK`` on the default model, ``TASK-MODEL`` on another (``multihop-gemma3-270m``)."""
    return task if model == DEFAULT_MODEL else f"{task}-{model}"


def eval_command(task: str, model: str) -> str:
    """The command line that writes `task`'s report for `model` into ``reports/``."""
    flag = "" if model == DEFAULT_MODEL else f" --model {model}"
    return f"patchscopes eval {task}{flag} --out reports/{folder_name(task, model)}"


def check_layers(owner: str, layers: Sequence[int], handle: ModelHandle) -> list[int]:
    """Validate a layer list against a model: every entry in 0..n_layers-1 (negatives count from the end)."""
    n = handle.n_layers
    checked = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise SpecError(f"{owner}={layer!r} is out of range for {handle.name} (allowed: {-n}..{n - 1})")
        checked.append(layer % n)
    return sorted(set(checked))


def lens_logits(handle: ModelHandle, states: torch.Tensor, normalised: bool = False) -> torch.Tensor:
    """The logit-lens Patchscope's readout, computed exactly: final norm (unless `normalised`), then unembedding.

    With T = S, i* = i = the last position and l* = the last layer, the patched state passes through nothing
    but the final norm and the unembedding, so this equals the pyvene run (a test checks it) at the cost of
    one matrix product. A source state of the last layer is already normalised (``skip_final_ln``).
    """
    model = handle.model
    with torch.no_grad():
        hidden = states.to(handle.device, handle.dtype)
        if not normalised:
            hidden = model.get_submodule(final_norm_path(model))(hidden)
        return model.get_output_embeddings()(hidden).float()


def sample_prefix(
    handle: ModelHandle, text: str, rng: random.Random, tries: int = 10, min_index: int = 2
) -> str | None:
    """The text cut after a random token, such that re-tokenising the cut gives the same tokens.

    Index 0 (the document start, an attention sink) and the first text token are never chosen. Like
    the official code, a cut that re-tokenises differently is re-drawn, up to `tries` times.
    """
    tokenizer = handle.tokenizer
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if len(ids) <= min_index:
        return None
    for _ in range(tries):
        index = rng.randrange(min_index, len(ids))
        prefix = text[: offsets[index][1]]
        if tokenizer(prefix, add_special_tokens=True)["input_ids"] == ids[: index + 1]:
            return prefix
    return None


def sample_prefixes(handle: ModelHandle, texts: Sequence[str], seed: int) -> list[str]:
    """One random prefix per text (fixed seed); texts without a clean cut are dropped."""
    rng = random.Random(seed)
    prefixes = (sample_prefix(handle, text, rng) for text in texts)
    return [p for p in prefixes if p is not None]


def generate_ids(
    handle: ModelHandle,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    batch_size: int = 64,
    progress: bool | None = None,
    desc: str = "generate",
) -> list[list[int]]:
    """Greedy new token ids after each unpatched prompt, each row up to and including its first EOS."""
    from tqdm.auto import tqdm

    from ..compat import pyvene_guard
    from ..execution.plain import greedy_config, until_eos
    from ..models.parts import generator
    from ..plan.batching import Batch, chunks

    rows: list[list[int]] = []
    batches = list(chunks(list(prompts), batch_size))
    config = greedy_config(handle, max_new_tokens)
    with pyvene_guard(handle.model), torch.no_grad():
        for batch_prompts in tqdm(
            batches, desc=desc, unit="batch", disable=not (progress if progress is not None else len(batches) > 2)
        ):
            batch = Batch.encode(handle, batch_prompts)
            inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
            output = generator(handle.model).generate(**inputs, generation_config=config)
            new = output.sequences[:, inputs["input_ids"].shape[1] :].tolist()
            rows.extend(until_eos(row, handle.tokenizer.eos_token_id) for row in new)
    return rows


def generate(
    handle: ModelHandle,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    batch_size: int = 64,
    progress: bool | None = None,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of unpatched prompts (the vanilla baselines and the known-fact filters)."""
    ids = generate_ids(handle, prompts, max_new_tokens, batch_size, progress, desc)
    return handle.tokenizer.batch_decode(ids, skip_special_tokens=True)


__all__ = [
    "EvalOptions",
    "folder_name",
    "eval_command",
    "check_layers",
    "lens_logits",
    "sample_prefix",
    "sample_prefixes",
    "generate",
    "generate_ids",
]
