"""Jacobian Scopes (arXiv:2601.16407): which input tokens drive a prediction, through pyvene.

spec (`JacobianScope`) -> engine (pyvene addition at the embeddings, y collected after the final norm,
vector-Jacobian products) -> `Attribution` -> views (HTML, PNG) / CLI ``patchscopes jacobian`` /
evaluation ``patchscopes eval jacobian`` / `read_attributed` (the top token, read by Patchscopes).
"""

from .engine import attribute, jacobian_scope
from .read import AttributedReading, read_attributed
from .result import Attribution
from .spec import FISHER_FORMS, VARIANTS, JacobianScope

__all__ = [
    "jacobian_scope",
    "attribute",
    "Attribution",
    "JacobianScope",
    "VARIANTS",
    "FISHER_FORMS",
    "read_attributed",
    "AttributedReading",
]
