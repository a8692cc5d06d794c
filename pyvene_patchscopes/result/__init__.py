"""Pure data: what a Patchscope reads out (PatchscopeResult, TokenProb) and the helpers that decode it; a sweep's
grid (SweepResult) and folder (SweepFolder).

``from pyvene_patchscopes.result import PatchscopeResult`` keeps working: the old module's public names are
re-exported here.
"""

from .patchscope import PatchscopeResult, TokenProb, decode_top, entropy_of, show_text, token_text, top_k, top_k_ids
from .sweep import SweepFolder, SweepResult

__all__ = [
    "PatchscopeResult",
    "TokenProb",
    "token_text",
    "show_text",
    "top_k_ids",
    "entropy_of",
    "decode_top",
    "top_k",
    "SweepResult",
    "SweepFolder",
]
