"""The Jacobian lens (Gurnee et al., 2026): J_l = E[∂h_final/∂h_l] fitted by the reference estimator (`fit`), read as
the Patchscope whose mapping is J_l and whose target is the last layer (`lens`), in the published .pt format."""

from ..persist.jlens import JacobianLens, logit_lens_equivalent
from .fit import ShortPromptWarning, fit_jacobian_lens, read_checkpoint, write_checkpoint

__all__ = [
    "JacobianLens",
    "fit_jacobian_lens",
    "logit_lens_equivalent",
    "read_checkpoint",
    "write_checkpoint",
    "ShortPromptWarning",
]
