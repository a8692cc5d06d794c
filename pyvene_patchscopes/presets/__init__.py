"""Ready-made Patchscopes from the paper: token identity, logit lens, attribute extraction, entity description,
multi-hop CoT rerouting, and the Future Lens; two readers of vectors, SelfIE and self-explanation; two trained
decoders as M* (a PEFT adapter, see `adapters`), Activation Oracles and LatentQA; and the Jacobian lens.

`prompts` holds the prompts they patch into, `recipes` the functions that build each Patchscope, `table` the named
presets (`Preset`, `PRESETS`, `build`). ``from pyvene_patchscopes.presets import build`` keeps working: the old
module's names are re-exported here.
"""

from .prompts import (
    ATTRIBUTE_PROMPT,
    ENTITY_DESCRIPTION_PROMPT,
    FUTURE_LENS_PROMPT,
    LATENTQA_CHATML,
    LATENTQA_LLAMA3,
    LATENTQA_QUESTION,
    LATENTQA_READ_LAYER,
    LATENTQA_WRITE_LAYER,
    OFFICIAL_TOKEN_IDENTITY_PROMPT,
    ORACLE_LAYER,
    ORACLE_PLACEHOLDER,
    ORACLE_QUESTION,
    SELF_EXPLANATION_PROMPT,
    SELFIE_PROMPT,
    TOKEN_IDENTITY_PROMPT,
    chat_prompt,
    oracle_prompt,
)
from .recipes import (
    activation_oracle,
    as_lens,
    attribute,
    entity_description,
    future_lens,
    jacobian_lens,
    latentqa,
    logit_lens,
    multihop,
    self_explanation,
    selfie,
    token_identity,
)
from .table import DECODER_PRESETS, LAST_LAYER, PRESETS, Preset, build, get_preset, recipe_options

__all__ = [
    "Preset",
    "PRESETS",
    "DECODER_PRESETS",
    "LAST_LAYER",
    "get_preset",
    "build",
    "recipe_options",
    "token_identity",
    "logit_lens",
    "attribute",
    "entity_description",
    "multihop",
    "future_lens",
    "selfie",
    "self_explanation",
    "activation_oracle",
    "latentqa",
    "as_lens",
    "jacobian_lens",
    "OFFICIAL_TOKEN_IDENTITY_PROMPT",
    "TOKEN_IDENTITY_PROMPT",
    "ENTITY_DESCRIPTION_PROMPT",
    "ATTRIBUTE_PROMPT",
    "FUTURE_LENS_PROMPT",
    "SELFIE_PROMPT",
    "SELF_EXPLANATION_PROMPT",
    "ORACLE_PLACEHOLDER",
    "ORACLE_LAYER",
    "ORACLE_QUESTION",
    "LATENTQA_READ_LAYER",
    "LATENTQA_WRITE_LAYER",
    "LATENTQA_QUESTION",
    "LATENTQA_LLAMA3",
    "LATENTQA_CHATML",
    "chat_prompt",
    "oracle_prompt",
]
