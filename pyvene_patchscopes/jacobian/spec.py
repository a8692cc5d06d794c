"""The Jacobian Scope spec: which attribution to compute, validated on construction, round-tripped through JSON.

A Jacobian Scope (Liu et al., arXiv:2601.16407) scores every input token t of a text by how strongly a
perturbation of its embedding moves the final hidden state y (after the final norm, at the prediction
position), seen through one output direction:

- ``semantic``:    ‖w_targetᵀ J_t‖₂, w_target the unembedding row of the target token (default: the prediction);
- ``fisher``:      tr(J_tᵀ F J_t), F = Wᵀ(diag(p) − ppᵀ)W the output softmax's Fisher information pulled back
  to y; ``fisher="exact"`` or ``"low-rank"`` (the top ``rank`` eigenvectors of F, the paper's default k = 1);
- ``temperature``: ‖(y/‖y‖)ᵀ J_t‖₂, the sensitivity of ‖y‖, which acts as an inverse temperature;
- ``gradient-x-input``: ‖(w_targetᵀ J_t) ⊙ x_t‖₂, the baseline the paper compares against.

J_t = ∂y/∂x_t, where x_t is token t's embedding as the first block receives it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Union

from ..errors import SpecError
from ..spec.checks import check_text
from ..spec.json import JsonSpec
from ..spec.parts import DEFAULT_MODEL

VARIANTS = {
    "semantic": "‖w_targetᵀ J_t‖: how token t moves the target token's logit",
    "fisher": "tr(J_tᵀ F J_t): how token t moves the whole next-token distribution (expected KL)",
    "temperature": "‖ŷᵀ J_t‖: how token t moves ‖y‖, the model's confidence",
    "gradient-x-input": "‖(w_targetᵀ J_t) ⊙ x_t‖: the gradient x input baseline",
}
FISHER_FORMS = ("low-rank", "exact")
JACOBIAN_FORMAT = "pyvene-patchscopes/jacobian-scope"
JACOBIAN_VERSION = 1

TargetToken = Union[str, int, None]


@dataclass(frozen=True)
class JacobianScope(JsonSpec):
    """What to attribute: the variant, the prediction position and token, and the Fisher form."""

    json_name = "Jacobian Scope"

    variant: str = "fisher"
    target_position: int = -1  # token index of the prediction (negative from the end, tokenizer prefix counted)
    target_token: TargetToken = None  # semantic and gradient-x-input only; None = the model's prediction
    fisher: str = "low-rank"
    rank: int = 1  # eigenvectors of F kept by the low-rank form
    model: str = DEFAULT_MODEL

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SpecError(f"JacobianScope.variant={self.variant!r} is not known (allowed: {', '.join(VARIANTS)})")
        if isinstance(self.target_position, bool) or not isinstance(self.target_position, int):
            raise SpecError(
                f"JacobianScope.target_position={self.target_position!r} is not allowed "
                "(allowed: an int token index, negative from the end)"
            )
        token = self.target_token
        if token is not None and (
            isinstance(token, bool)
            or not isinstance(token, (str, int))
            or (isinstance(token, str) and not token)
            or (isinstance(token, int) and token < 0)
        ):
            raise SpecError(
                f"JacobianScope.target_token={token!r} is not allowed "
                "(allowed: None for the prediction, a one-token string, or a token id >= 0)"
            )
        if isinstance(token, str):
            check_text("JacobianScope.target_token", token)
        if token is not None and self.variant not in ("semantic", "gradient-x-input"):
            raise SpecError(
                f"JacobianScope.target_token={token!r} is not allowed with variant={self.variant!r} "
                "(allowed: only with semantic and gradient-x-input, which read one token's logit)"
            )
        if self.fisher not in FISHER_FORMS:
            raise SpecError(f"JacobianScope.fisher={self.fisher!r} is not known (allowed: {', '.join(FISHER_FORMS)})")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SpecError(
                f"JacobianScope.rank={self.rank!r} is not allowed (allowed: an integer >= 1, at most the hidden size)"
            )
        if not isinstance(self.model, str) or not self.model.strip():
            raise SpecError(f"JacobianScope.model={self.model!r} is not allowed (allowed: a model name)")

    @property
    def label(self) -> str:
        """A short name for tables: 'fisher (low-rank, k=1)', 'semantic', ..."""
        if self.variant != "fisher":
            return self.variant
        return "fisher (exact)" if self.fisher == "exact" else f"fisher (low-rank, k={self.rank})"

    # ---- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": JACOBIAN_FORMAT, "version": JACOBIAN_VERSION, **asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: object) -> "JacobianScope":
        if not isinstance(data, dict):
            raise SpecError(f"Jacobian Scope JSON must be an object, got {type(data).__name__}")
        fmt, version = data.get("format"), data.get("version")
        if fmt != JACOBIAN_FORMAT:
            raise SpecError(f"spec format={fmt!r} is not allowed (allowed: {JACOBIAN_FORMAT!r})")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= JACOBIAN_VERSION:
            raise SpecError(
                f"spec version={version!r} is not supported by this library "
                f"(allowed: 1..{JACOBIAN_VERSION}); upgrade pyvene-patchscopes to read newer specs"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format", "version"})
        if unknown:
            raise SpecError(f"Jacobian Scope spec has unknown field(s) {unknown} (allowed: {sorted(known)})")
        return cls(**{k: v for k, v in data.items() if k in known})


__all__ = ["JacobianScope", "VARIANTS", "FISHER_FORMS", "JACOBIAN_FORMAT", "JACOBIAN_VERSION"]
