"""Scale search: vectors written at several scales α (and target layers l*), each readout scored by self-similarity
and entropy, and the rule that picks α.

A vector's readout depends strongly on its scale: too small and the prompt's own word wins, too large and the model
degenerates (Kharlapenko et al., "Self-explaining SAE features", 2024, choose the scale per latent from two
scores). For every (vector, l*, α) this runs one Patchscope, all of them in one batched `run` (the planned
execution shares the target prompt and packs the rows under the token budget), and records:

- **self-similarity**: cos(h_end, f(v)), with h_end the target's last block output (before the final norm) at the
  end of T, where the readout is made: how much of the written direction reaches the position that answers;
- **entropy**: the entropy (nats) of the next-token distribution at the end of T.

Both are read where Kharlapenko et al.'s scripts read them (github.com/neverix/micrlhf-progress,
``sprint/scale_tuning_gemma.py``: the residual at the prompt's last token, and the entropy of the first generated
token). Self-similarity read at the written slot instead rises with α whatever v is, since the slot holds α·v
itself: that made the rule pick the largest α for every vector, a random one included.

The rule (`ScaleSearch.choose`): per vector, the (l*, α) that maximises
``self_similarity − weight · entropy / ln |V|`` (|V| the vocabulary size, so both terms lie in [0, 1]); ``weight``
is the rule's one parameter, chosen on a dev split where an evaluation uses it (tutorial 06). (Their scripts
combine the two as 0.4·s/max(s) − 0.6·H/max(H) over one latent's scales, each taken relative to scale 0; here the
scale of each term is fixed, so that one weight means the same for every vector.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from ..errors import SpecError
from ..execution.engine import run
from ..models import ModelHandle
from ..result import PatchscopeResult
from ..spec import Patchscope, Target, VectorSource
from ..spec.writes import check_alpha

DEFAULT_ALPHAS = (2.0, 4.0, 8.0, 16.0, 32.0)


@dataclass(frozen=True)
class ScaleChoice:
    """What the rule picked for one vector: its l* and α, the scores of that cell, and the readout there."""

    vector: str  # the vector's name
    layer: int  # l*
    alpha: float  # α
    score: float  # self_similarity − weight · entropy / ln |V|
    self_similarity: float
    entropy: float
    result: PatchscopeResult = field(repr=False)


@dataclass
class ScaleSearch:
    """Readouts and scores of every (vector, l*, α): tensors are [vectors, layers, alphas]."""

    vectors: list[VectorSource]
    layers: list[int] | None  # the l* searched; None: each vector's own layer (l* = l)
    alphas: list[float]
    results: list[PatchscopeResult]  # in the order vector, then layer, then alpha
    self_similarity: torch.Tensor
    entropy: torch.Tensor
    vocab_size: int

    def result(self, vector: int, layer: int, alpha: int) -> PatchscopeResult:
        """The readout of vector `vector` at the `layer`-th l* and the `alpha`-th α (indices into the lists)."""
        return self.results[(vector * self.n_layers + layer) * len(self.alphas) + alpha]

    @property
    def n_layers(self) -> int:
        return 1 if self.layers is None else len(self.layers)

    def target_layer(self, vector: int, layer: int) -> int:
        return self.vectors[vector].layer if self.layers is None else self.layers[layer]

    def score(self, weight: float = 1.0) -> torch.Tensor:
        """The rule's score, self_similarity − weight · entropy / ln |V|, for every cell."""
        return self.self_similarity - check_alpha(weight, "weight") * self.entropy / math.log(self.vocab_size)

    def choose(self, weight: float = 1.0) -> list[ScaleChoice]:
        """Per vector, the l* and α of the highest score (the first one on a tie), with its scores and readout."""
        score = self.score(weight)
        choices = []
        for v, cell in enumerate(score.flatten(1).argmax(1).tolist()):
            i, j = divmod(cell, len(self.alphas))
            choices.append(
                ScaleChoice(
                    self.vectors[v].name,
                    self.target_layer(v, i),
                    self.alphas[j],
                    float(score[v, i, j]),
                    float(self.self_similarity[v, i, j]),
                    float(self.entropy[v, i, j]),
                    self.result(v, i, j),
                )
            )
        return choices

    def to_records(self) -> list[dict[str, Any]]:
        """One flat record per (vector, l*, α), for a DataFrame; ``agrees_with_null`` marks a reading that is the
        target's own with nothing written (`PatchscopeResult.agrees_with_null`)."""
        records = []
        for v, vector in enumerate(self.vectors):
            for i in range(self.n_layers):
                for j, alpha in enumerate(self.alphas):
                    result = self.result(v, i, j)
                    records.append(
                        {
                            "vector": vector.name,
                            "target_layer": self.target_layer(v, i),
                            "alpha": alpha,
                            "token": result.token,
                            "prob": result.prob,
                            "generation": result.generation,
                            "agrees_with_null": result.agrees_with_null,
                            "self_similarity": float(self.self_similarity[v, i, j]),
                            "entropy": float(self.entropy[v, i, j]),
                        }
                    )
        return records


def scale_search(
    vectors: Sequence[VectorSource],
    model: ModelHandle,
    target: Target | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 0,
    top: int = 10,
    planned: bool = True,
    progress: bool | None = None,
    max_batch_tokens: int | None = None,
) -> ScaleSearch:
    """Write each vector at every α (and every l* in `layers`) into `target` and score each readout.

    `target` gives T, the slots and the write mode (its ``alpha`` and ``layer`` are replaced); by default the
    self-explanation prompt with α·v replacing both X (`presets.self_explanation`). `layers` defaults to each
    vector's own layer (l* = l). All cells run as one batched `run`.
    """
    from ..presets import self_explanation

    vectors = list(vectors)
    if not vectors or not all(isinstance(v, VectorSource) for v in vectors):
        raise SpecError(
            "scale_search vectors must be a non-empty list of VectorSource (allowed: e.g. "
            "[vectors.sae_source(sae, k, model) for k in latents])"
        )
    alphas = [check_alpha(a, "alphas[]") for a in alphas]
    if not alphas:
        raise SpecError("scale_search alphas is empty (allowed: one or more finite numbers)")
    grid_layers = list(layers) if layers is not None else None
    scopes: list[Patchscope] = []
    for vector in vectors:
        base = self_explanation(vector) if target is None else Patchscope(vector, target)
        for layer in grid_layers if grid_layers is not None else [vector.layer]:
            for alpha in alphas:
                scopes.append(
                    replace(base, target=replace(base.target, layer=layer, alpha=alpha), max_new_tokens=max_new_tokens)
                )
    options: dict[str, Any] = {} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}
    results = run(
        scopes, model, top=top, planned=planned, progress=progress, keep_logits=False, keep_scores=True, **options
    )
    n_layers = len(grid_layers) if grid_layers is not None else 1
    shape = (len(vectors), n_layers, len(alphas))
    written = torch.stack([_written(scope.source) for scope in scopes])  # type: ignore[arg-type]  # VectorSources, typed Source
    finals = torch.stack([result.final_state for result in results])  # type: ignore[misc]  # keep_scores: every final_state is set
    similarity = torch.cosine_similarity(finals.float(), written.float(), dim=-1).view(shape)
    entropy = torch.tensor([result.entropy for result in results], dtype=torch.float32).view(shape)
    vocab = int(model.model.get_output_embeddings().weight.shape[0])
    return ScaleSearch(vectors, grid_layers, alphas, results, similarity, entropy, vocab)


def _written(source: VectorSource) -> torch.Tensor:
    """The v self-similarity compares with: the vector, or its last row when it has one per slot."""
    return source.tensor if source.tensor.ndim == 1 else source.tensor[-1]


__all__ = ["ScaleSearch", "ScaleChoice", "scale_search", "DEFAULT_ALPHAS"]
