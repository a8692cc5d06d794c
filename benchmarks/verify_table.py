"""Issue 39's table with plain forward hooks on SmolLM2 (no pyvene, no package execution code).

    python benchmarks/verify_table.py "<|endoftext|>" "<|im_start|>" none

Each argument is the document token put before S and before every carrier (none: no token). Found (2026-12-06, CPU,
float32): with <|endoftext|>, the token `load_model` puts first, D of ' CEO' and ' hello' and the count of controls
below each are the table's to 3 decimals at all four layers; the table's control median is the upper median,
sorted(D)[20] of 40 (printed here is the mean-of-two median, which moves hello's score at layer 10 to -0.10).
<|im_start|> and no token are 0.1 and more off.
"""

import statistics
import sys

import torch

from pyvene_patchscopes import load_model

WORDS = (
    "table river green music doctor apple engine window seven paper garden silver mountain teacher bottle "
    "dance winter camera island pencil tiger market storm castle ocean butter pilot candle forest rocket "
    "soccer violin planet coffee hammer jacket lemon mirror nurse orange"
).split()
S = "Amazon's former CEO attended Oscars"
LAYERS = (2, 10, 18, 26)
TABLE = {2: (1.00, -0.06), 10: (0.96, -0.08), 18: (0.38, 0.07), 26: (0.19, 0.04)}

handle = load_model("smollm2-135m")
tok, model = handle.tokenizer, handle.model
blocks = model.model.layers


def ids_of(text, doc):
    body = tok(text, add_special_tokens=False)["input_ids"]
    return ([tok.convert_tokens_to_ids(doc)] if doc else []) + body


def forward(ids, layer, write=None, read=None):
    seen = {}

    def hook(mod, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if read is not None:
            seen["h"] = hidden[0, read].clone()
        if write is not None:
            hidden[0, write[0]] = write[1]
        return out

    handle_ = blocks[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        handle_.remove()
    return logits, seen.get("h")


def carrier_state(word, layer, doc, template):
    ids = ids_of(template + word, doc)
    return forward(ids, layer, read=len(ids) - 1)[1]


def disruption(ids, i, layer, vec, orig):
    patched = forward(ids, layer, write=(i, vec))[0]
    logp, logq = torch.log_softmax(orig[i:], -1), torch.log_softmax(patched[i:], -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def table(doc, template="Here is a word: ", s_doc="same"):
    sd = doc if s_doc == "same" else s_doc
    ids = ids_of(S, sd)
    i = next(k for k in range(len(ids)) if tok.decode(ids[k]) == " CEO")
    orig = forward(ids, 0)[0]
    print(f"doc={doc!r} S doc={sd!r} template={template!r} i={i} tokens={tok.convert_ids_to_tokens(ids)}")
    worst = 0.0
    for layer in LAYERS:
        ctrl = [disruption(ids, i, layer, carrier_state(w, layer, doc, template), orig) for w in WORDS]
        med = statistics.median(ctrl)
        d_ceo = disruption(ids, i, layer, carrier_state("CEO", layer, doc, template), orig)
        d_hello = disruption(ids, i, layer, carrier_state("hello", layer, doc, template), orig)
        s_ceo, s_hello = 1 - d_ceo / med, 1 - d_hello / med
        below = (sum(c < d_ceo for c in ctrl), sum(c < d_hello for c in ctrl))
        worst = max(worst, abs(s_ceo - TABLE[layer][0]), abs(s_hello - TABLE[layer][1]))
        print(
            f"  l={layer:2d} D CEO {d_ceo:.3f} hello {d_hello:.3f} median {med:.3f} "
            f"score {s_ceo:+.3f}/{s_hello:+.3f} below {below[0]}/{below[1]} of 40"
        )
    print(f"  largest |score - table| = {worst:.3f}")


for doc in sys.argv[1:] or ["<|endoftext|>"]:
    table(None if doc == "none" else doc)
