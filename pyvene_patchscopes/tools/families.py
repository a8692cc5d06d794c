"""Every causal-LM class of the installed transformers on a tiny random config: the path each one takes, and why.

The classes come from transformers' own ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, so a new release's families are
surveyed without anyone editing a list. Every size keyword a config class takes is set to a tiny value
(hidden 64, 4 layers, 4 heads, 2 key/value heads, 4 experts, special ids 0 and 1); a multimodal config gets a
tiny text config. Five hybrids and layouts get the few keys their validators tie together (`_LAYOUTS`).
Each class then gets one verdict (`Verdict.path`):

- ``planned``: the architecture is found and the planned execution reproduces hand-written hooks on the model's
  own forward, sharing the target prompt's prefix (``execution="shared prefix"``) or, where that cannot be exact
  (recurrent layers, position biases, attention of its own), the layers below l* (``"shared layers"``);
- ``plain``: it runs on the plain pyvene path, with the reason the shared prefix cannot be exact;
- ``refused``: `architectures.architecture` refuses it, with its error;
- ``not built``: its tiny config cannot be built or run, with the reason;
- ``not a decoder``: an encoder, or the decoder half of an encoder-decoder model.

``patchscopes families`` prints the survey; the manual's family table (docs/reference/families.md) is its `markdown`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Literal

import torch
from torch import nn

from ..errors import PatchscopeError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

Path = Literal["planned", "plain", "refused", "not built", "not a decoder"]
VOCAB = 320
MAX_PARAMETERS = 5_000_000  # a config whose sizes are not all set generically stays big: listed, not built
_TINY = dict(hidden=64, layers=4, heads=4, kv_heads=2, ffn=128, head=16, positions=128, experts=4)
SIZES: dict[str, object] = dict(
    vocab_size=VOCAB,
    hidden_size=_TINY["hidden"],
    num_hidden_layers=_TINY["layers"],
    num_attention_heads=_TINY["heads"],
    num_key_value_heads=_TINY["kv_heads"],
    intermediate_size=_TINY["ffn"],
    head_dim=_TINY["head"],
    max_position_embeddings=_TINY["positions"],
    sliding_window=16,
    # the same sizes under the older names (GPT-2, GPT-J, MPT, OPT, XGLM, ...)
    n_embd=_TINY["hidden"],
    n_layer=_TINY["layers"],
    n_head=_TINY["heads"],
    n_positions=_TINY["positions"],
    n_ctx=_TINY["positions"],
    n_inner=_TINY["ffn"],
    d_model=_TINY["hidden"],
    n_layers=_TINY["layers"],
    n_heads=_TINY["heads"],
    num_layers=_TINY["layers"],
    num_heads=_TINY["heads"],
    ffn_dim=_TINY["ffn"],
    attention_heads=_TINY["heads"],
    decoder_layers=_TINY["layers"],
    decoder_attention_heads=_TINY["heads"],
    decoder_ffn_dim=_TINY["ffn"],
    dff=_TINY["ffn"],
    d_ff=_TINY["ffn"],
    rotary_dim=8,
    word_embed_proj_dim=64,
    embed_dim=_TINY["hidden"],
    multi_query_group_num=_TINY["kv_heads"],
    kv_channels=_TINY["head"],
    ffn_hidden_size=_TINY["ffn"],
    unpadded_vocab_size=VOCAB,
    sliding_window_size=16,
    # the same sizes under the names of sliding-window, linear-attention and index heads, dense first blocks
    swa_num_attention_heads=_TINY["heads"],
    swa_num_key_value_heads=_TINY["kv_heads"],
    swa_head_dim=_TINY["head"],
    linear_num_heads=_TINY["heads"],
    linear_head_dim=_TINY["head"],
    index_n_heads=2,
    index_head_dim=_TINY["head"],
    dim_head=_TINY["head"],
    dim_ff=_TINY["ffn"],
    first_dense_intermediate_size=_TINY["ffn"],
    shared_intermediate_size=32,
    shared_experts_intermediate_size=32,
    # per-layer inputs (Gemma 3n and 4)
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16,
    # mixtures of experts
    num_local_experts=_TINY["experts"],
    num_experts=_TINY["experts"],
    n_routed_experts=_TINY["experts"],
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    expert_ffn_hidden_size=32,
    zero_expert_num=2,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    # latent attention: keys of nope + rope = 24 dimensions, values of 16
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)
# layouts the generic sizes cannot meet, by model type: which of the 4 layers attend (a hybrid whose tiny config
# has no attention layer cannot run with a cache), and head counts a family's validator ties to the width
_LAYOUTS: dict[str, dict[str, object]] = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1, 3]),
    "bailing_hybrid": dict(layer_group_size=2),
    "mamba2": dict(num_heads=8, n_groups=1, expand=2),
    "cohere_compass_text": dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=10000.0)}),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_dense_layers=1),
    "kolibri1_1": dict(index_num_heads=2),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
    "dbrx": dict(
        attn_config=dict(rope_theta=10000.0, kv_n_heads=2, clip_qkv=8.0),
        d_model=64,
        ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2),
    ),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"]),
    "gemma3n_text": dict(num_kv_shared_layers=2, activation_sparsity_pattern=[0.0] * 4),
    # a drafter (listed as not a decoder); its config is built for the test that `wrap_model` refuses it
    "gemma4_assistant": dict(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=4,
            vocab_size=VOCAB,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0,
        )
    ),
    "zaya": dict(num_experts_per_tok=1),
    "zamba": dict(attn_layer_period=2, attn_layer_offset=0),
    "zamba2": dict(layers_block_type=["mamba", "hybrid", "mamba", "hybrid"]),
    "qwen4_exp_text": dict(
        indexer_budget=8, indexer_compress_ratio=2, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16
    ),
    "longcat_flash": dict(head_dim=8, moe_topk=2),
    "xlstm": dict(qk_dim_factor=1.0),
    "musicgen_decoder": dict(num_codebooks=1),
    "musicgen_melody_decoder": dict(num_codebooks=1),
    "gemma4_unified": dict(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            mm_embed_dim=64,
            mm_posemb_size=16,
            output_proj_dims=64,
        )
    ),
    "phi4_multimodal": dict(
        audio_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_blocks=1,
            num_attention_heads=4,
            ext_pw_out_channel=64,
            depthwise_separable_out_channel=64,
            nemo_conv_channels=64,
        )
    ),
    "blt": dict(encoder_hash_byte_group_vocab=64),
    "dots3_note_text": dict(
        per_layer_config={
            i: dict(
                num_attention_heads=4,
                num_key_value_heads=4,
                q_lora_rank=32,
                kv_lora_rank=16,
                head_dim=24,
                qk_nope_head_dim=16,
                v_head_dim=16,
                qk_rope_head_dim=8,
            )
            for i in (2, 3)
        }
    ),
}
_GENERIC = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
)
_VISION = dict(image_size=28, patch_size=14, num_hidden_layers=1)
_MULTIMODAL = dict(mm_tokens_per_image=4)
# the head size follows from these where a config has them (latent attention: nope + rope parts)
_DERIVED_HEAD = ("qk_rope_head_dim",)


@dataclass(frozen=True)
class Verdict:
    """The path one causal-LM class takes, and why (empty for ``planned``)."""

    name: str  # the class, e.g. "MixtralForCausalLM"
    model_type: str  # its config's model_type, e.g. "mixtral"
    path: Path
    reason: str = ""
    reroute: str = ""  # why multi-hop rerouting is refused on it ("" where it runs, or the class does not run)
    execution: str = ""  # planned: "shared prefix"; where the prefix cannot be exact, "shared layers" or "own forward"
    prefix: str = ""  # for "shared layers" and "own forward": why the shared prefix cannot be exact


def causal_lm_classes() -> dict[str, str]:
    """Every causal-LM class name of the installed transformers, with the first model type mapped to it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    classes: dict[str, str] = {}
    for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        classes.setdefault(name, model_type)
    return dict(sorted(classes.items()))


def not_decoder_only(model_type: str, class_name: str | None = None) -> str:
    """Why a mapped class is not a decoder-only model ("" when it is): an encoder, half of a seq2seq model, or a
    drafter that reads another model's keys and values."""
    import transformers

    from ..models.discovery import DRAFTER, drafter, not_a_decoder

    if class_name is not None and drafter(getattr(transformers, class_name)):
        return DRAFTER
    return {
        "encoder-decoder": "the decoder half of an encoder-decoder model",
        "encoder": "an encoder (a masked LM) run as a decoder",
        "": "",
    }[not_a_decoder(model_type)]


def _keywords(config_class: type[PreTrainedConfig]) -> set[str]:
    """The keywords the config class's constructor takes."""
    return set(inspect.signature(config_class.__init__).parameters)


def _sizes_for(config_class: type[PreTrainedConfig]) -> dict[str, object]:
    accepted = _keywords(config_class)
    kwargs = {k: v for k, v in SIZES.items() if k in accepted}
    if any(k in accepted for k in _DERIVED_HEAD):
        kwargs.pop("head_dim", None)
    if "kv_lora_rank" in accepted and "num_key_value_heads" in kwargs:  # latent attention: one key per head
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    return kwargs


def tiny_config(class_name: str):
    """The class's config class with every size keyword it takes set to a tiny value (multimodal: its text one)."""
    import transformers

    config_class = getattr(transformers, class_name).config_class
    kwargs = _sizes_for(config_class)
    for name, sub in (getattr(config_class, "sub_configs", None) or {}).items():
        if not isinstance(sub, type):
            continue
        if sub.__name__ == "AutoConfig":  # the family's default sub-model, built from a dict of sizes
            if name in ("text_config", "vision_config"):
                kwargs[name] = {**{k: SIZES[k] for k in _GENERIC}, **(_VISION if name == "vision_config" else {})}
            continue
        sizes = _sizes_for(sub)
        if name != "text_config":  # vision and audio towers: one layer, a 2 x 2 grid of patches
            sizes.update({k: v for k, v in _VISION.items() if k in _keywords(sub)})
        try:
            kwargs[name] = sub(**sizes)
        except (ValueError, TypeError):  # a tower whose validators tie sizes the generic ones miss: its defaults
            continue
    kwargs.update({k: v for k, v in _MULTIMODAL.items() if k in inspect.signature(config_class.__init__).parameters})
    kwargs.update(_LAYOUTS.get(getattr(config_class, "model_type", ""), {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_class(**kwargs)


def tiny_model(class_name: str, seed: int = 0) -> nn.Module:
    """A tiny random fp32 model of `class_name` in eval mode; raises whatever building or one forward raises."""
    import transformers

    cls = getattr(transformers, class_name)
    config = tiny_config(class_name)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parameters = sum(p.numel() for p in cls(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise ValueError(
            f"its tiny config still has {parameters:,} parameters: a size it needs is not one of the generic keywords"
        )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config).eval()
        with torch.no_grad():  # both without a cache and with one (generation), as Patchscopes run it
            model(input_ids=torch.tensor([[5, 9, 17]]), use_cache=False)
            model(input_ids=torch.tensor([[5, 9, 17]]), use_cache=True)
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0][:160] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def verdict(class_name: str, model_type: str, model: nn.Module | None = None) -> Verdict:
    """The path `class_name` takes on its tiny model (built here unless `model` is given)."""
    from ..execution.check import execution, planned_reason, prefix_reason
    from ..execution.reroute import reroute_reason
    from ..models.architectures import architecture

    why = not_decoder_only(model_type, class_name)
    if why:
        return Verdict(class_name, model_type, "not a decoder", why)
    if model is None:
        try:
            model = tiny_model(class_name)
        except Exception as err:  # noqa: BLE001 -- any failure to build is this class's listed reason
            reason = (
                str(err)
                if isinstance(err, ValueError) and "tiny config" in str(err)
                else f"its tiny config does not build or run ({_first_line(err)})"
            )
            return Verdict(class_name, model_type, "not built", reason)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            architecture(model)
            why, reroute, kind = planned_reason(model), reroute_reason(model), execution(model)
            prefix = prefix_reason(model) if kind not in ("", "shared prefix") else ""
    except PatchscopeError as err:
        return Verdict(class_name, model_type, "refused", str(err))
    return Verdict(class_name, model_type, "plain" if why else "planned", why, reroute, kind, prefix)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Building a hundred odd configs makes transformers log and some kernels print: keep stdout clean (the
    CLI's --json goes there) and transformers' verbosity as it was."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        hf_logging.set_verbosity(level)


def survey(progress: bool = False) -> list[Verdict]:
    """One `Verdict` per causal-LM class of the installed transformers (about 15 s on 2 CPU cores)."""
    from tqdm.auto import tqdm

    classes = causal_lm_classes()
    with _quiet():
        return [verdict(name, kind) for name, kind in tqdm(classes.items(), desc="families", disable=not progress)]


def counts(verdicts: Iterable[Verdict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in verdicts:
        out[v.path] = out.get(v.path, 0) + 1
    return out


def markdown(verdicts: list[Verdict]) -> str:
    """The manual's table (docs/reference/families.md): one row per class, its path and the reason, after a line
    of counts."""
    import transformers

    tally = counts(verdicts)
    decoders = sum(n for path, n in tally.items() if path != "not a decoder")
    built = decoders - tally.get("not built", 0)
    planned = tally.get("planned", 0)
    layered = sum(v.execution == "shared layers" for v in verdicts)
    replayed = sum(v.execution == "own forward" for v in verdicts)
    head = (
        f"transformers {transformers.__version__}: {len(verdicts)} causal-LM classes, {decoders} of them "
        "decoder-only; "
        + ", ".join(f"{tally.get(p, 0)} {p}" for p in ("planned", "plain", "refused", "not built"))
        + f". {planned} of the {decoders} decoder-only classes ({100 * planned / max(decoders, 1):.0f}%) take the "
        f"planned execution ({planned - layered - replayed} sharing the prompt's prefix, {layered} sharing the "
        f"layers below l*, {replayed} replaying them in the model's own forward); of the {built} whose tiny config "
        f"builds, {100 * planned / max(built, 1):.0f}%."
    )
    rows = ["| class | model type | path | reason | multi-hop rerouting |", "|---|---|---|---|---|"]
    rows += [
        f"| `{v.name}` | {v.model_type} | {_path_cell(v)} | {_cell(_reason(v))} | {_reroute_cell(v)} |"
        for v in verdicts
    ]
    return head + "\n\n" + "\n".join(rows)


def _path_cell(v: Verdict) -> str:
    return f"planned ({v.execution})" if v.path == "planned" else v.path


def _reason(v: Verdict) -> str:
    return f"the shared prefix cannot be exact: {v.prefix}" if v.prefix else v.reason


def _reroute_cell(v: Verdict) -> str:
    if v.reroute:
        return "refused: " + _cell(v.reroute)
    return "runs" if v.path in ("planned", "plain") else ""


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


__all__ = [
    "Verdict",
    "SIZES",
    "VOCAB",
    "causal_lm_classes",
    "not_decoder_only",
    "tiny_config",
    "tiny_model",
    "verdict",
    "survey",
    "counts",
    "markdown",
]
