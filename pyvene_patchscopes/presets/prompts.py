"""The prompts the presets patch into, each with its source and what was measured: the identity, description and
attribute prompts of the paper, the Future Lens's context, SelfIE's and self-explanation's interpretation prompts,
and the Activation Oracle's and LatentQA's dialogues (with `chat_prompt` and `oracle_prompt`, which build them)."""

from __future__ import annotations

# A modification of the official few-shot identity prompt. The official next_token_prediction notebook uses
# "cat -> cat\n1135 -> 1135\nhello -> hello\n?" with the patch on its last token "?", read at that same
# position: what it reads is the *next* token after the patched state (the paper's next-token experiment).
# We append " ->" and patch "?", so the model reads the patched token's *identity*, as the demonstrations
# show it: that is what the token-identity preset asks. Measured on SmolLM2-135M, 16 words, l = l* in 0..16:
# 16/16 decoded at every layer with " ->", against 2/16 for the prompt patched at its end, whose next token
# is nearly always the arrow rather than the word. Pass target_prompt=OFFICIAL_TOKEN_IDENTITY_PROMPT to use the
# official form (the preset then patches and reads its last token, "?").
OFFICIAL_TOKEN_IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
TOKEN_IDENTITY_PROMPT = OFFICIAL_TOKEN_IDENTITY_PROMPT + " ->"
ENTITY_DESCRIPTION_PROMPT = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: "
    "South Korean multinational major appliance and consumer electronics corporation, x"
)
ATTRIBUTE_PROMPT = "The capital city of x is"
# The Future Lens (Pal et al., CoNLL 2023) with a fixed prompt: the first of the "natural, normal contexts" that
# their causal baseline patches instead of the learned soft prompt (github.com/KoyenaPal/future-lens,
# causal_methods/module.py, GPTJModule._COMPARE_CONTEXT[10][0], the default --context_idx 0); the state goes on
# its last token ' "'. The Patchscopes paper (Table 1) lists the learned prompt, which must be trained per model.
# Measured on SmolLM2-135M (100 prose prefixes, l = l* in 0..28 step 2 and 29; `patchscopes eval future`), none of
# three alternatives did better beyond the noise (±0.08) at steps 2-3: Pal et al.'s second context
# 'The multi-tokens present here are "' (best step 2 / 3 over layers: 0.23 / 0.06), a few-shot quotation
# prompt (0.19 / 0.08) and a few-shot "Repeat the text" prompt (0.22 / 0.06), against 0.22 / 0.10 for this one.
FUTURE_LENS_PROMPT = 'Hello! Could you please tell me more about "'


# SelfIE (Chen et al., 2024, arXiv:2403.10949; github.com/tonychenxyz/selfie, README and interpret()): the
# interpretation prompt InterpretationPrompt(tokenizer, ("[INST]", 0, 0, 0, 0, 0, "[/INST] Sure, I will summarize the
# message:")), each 0 a "_ " placeholder. The state is written at every placeholder at the input of layer k = 1 (here
# l* = 0, block 0's output), on the prompt pass only, in the 'normalized' mode with overlay_strength 1 (a mix at
# α = 1, which replaces). Here in SmolLM2's chat format (ChatML) instead of Llama 2's [INST] tags.
SELFIE_PROMPT = "<|im_start|>user\n_ _ _ _ _<|im_end|>\n<|im_start|>assistant\nSure, I will summarize the message:"
# Self-explaining SAE features (Kharlapenko, neverix, Nanda and Conmy, 2024;
# alignmentforum.org/posts/8ev6coxChSWcxCDy8):
# "we give the model a prompt like 'What does X mean?', replace the residual stream on X with the decoder direction
# times some scale, and have it generate an explanation". Their Gemma prompt asks for the meaning of the word "X" and
# starts the answer; here in ChatML, X written at both of its occurrences, scaled by α (write="replace", alpha=α).
SELF_EXPLANATION_PROMPT = (
    '<|im_start|>user\nWhat is the meaning of the word "X"?<|im_end|>\n<|im_start|>assistant\n'
    'The meaning of the word "X" is "'
)

# Activation Oracles (Karvonen et al., 2025; github.com/adamkarvonen/activation_oracles at 55f153f,
# nl_probes/utils/dataset_utils.py get_introspection_prefix and nl_probes/utils/steering_hooks.py): the oracle, a LoRA
# on the base model, gets the user turn f"Layer: {l}\n" + " ?" * K + " \n" + question in the base model's chat template
# (a generation prompt, no system turn, thinking off). The K vectors (states read at the output of block l of the
# base model, adapter off; 25/50/75 % of the depth, 50 % their default) are added at the first K " ?" tokens at the
# output of block 1, matched to the norm there: h <- h + c * ||h|| * v/||v||, c = 1, on the prompt pass only.
ORACLE_PLACEHOLDER = " ?"
ORACLE_LAYER = 1
ORACLE_QUESTION = "Can you describe what is happening in this text?"
# LatentQA (Pan et al., 2024, arXiv:2412.08686; github.com/aypan17/latentqa at e40cc44, lit/configs/interpret_config.py
# and lit/utils/activation_utils.py): the decoder (a LoRA on Llama-3-8B-Instruct, aypan17/latentqa_llama-3-8b-instruct)
# reads states of block 15's output of the target model and has them replace, in order, the "?" placeholders of its
# first user turn at the output of its block 0. Its chat template renames the assistant "reflect" and starts with a
# fixed exchange (lit/utils/dataset_utils.py BASE_DIALOG); here in ChatML, as SmolLM2 and the other presets use it.
LATENTQA_READ_LAYER, LATENTQA_WRITE_LAYER = 15, 0
LATENTQA_QUESTION = "What type of persona will the assistant adopt?"
LATENTQA_LLAMA3 = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{placeholders}<|eot_id|>"
    "<|start_header_id|>reflect<|end_header_id|>\n\nSure, I've analyzed the assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
    "<|start_header_id|>reflect<|end_header_id|>\n\n"
)
LATENTQA_CHATML = (
    "<|im_start|>user\n{placeholders}<|im_end|>\n<|im_start|>reflect\nSure, I've analyzed the "
    "assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>reflect\n"
)


def chat_prompt(user: str, tokenizer=None) -> str:
    """`user` as one user turn with a generation prompt: the tokenizer's own chat template where it has one
    (thinking off, as the oracles are trained), else ChatML (SmolLM2's)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def oracle_prompt(question: str, source_layer: int, k: int = 1, tokenizer=None) -> str:
    """The Activation Oracle's prompt: "Layer: l" then K placeholders " ?" then the question, chat-templated."""
    return chat_prompt(f"Layer: {source_layer}\n{ORACLE_PLACEHOLDER * k} \n{question}", tokenizer)


__all__ = [
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
